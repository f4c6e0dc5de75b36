"""Training speed of llamalora against the old recipe and plain HF + PEFT, on one GPU (issue 5).

    python3 benchmarks/make_random_11b.py /tmp/m11b                  # once: random 11B, no download
    python3 benchmarks/speed.py --model /tmp/m11b --json-out speed.json  # the speed table
    python3 benchmarks/speed.py --model /tmp/m11b --numerics --json-out numerics.json
    python3 benchmarks/speed.py --model tiny --device cpu --steps 2 --skip 1   # smoke test

Recipes, each in its own process (so its peak memory is its own and the GPU is empty again for
the next), in this order, all on the same records with the same seed, LoRA r 8 / alpha 32 /
dropout 0.05 on q,k,v,o, max length 512, 4 records per optimizer step:

  old              the old one-file script: HF Trainer, bnb 8-bit (fp16), 2 x 2, padded to 512,
                   gradient checkpointing, loss on prompt and response
  hf-8bit/-4bit/-bf16  plain HF Trainer + PEFT (prepare_model_for_kbit_training on a k-bit
                   base): batch 4 x 1, padded to the batch's longest, no checkpointing, bf16,
                   loss on the response (llamalora's labels)
  hf-packed-bf16/-8bit  HF Trainer + PEFT for long records: batch 2 x 2, padding-free
                   (transformers' DataCollatorWithFlattening), gradient checkpointing
  llamalora-8bit/-4bit/-none  `llamalora.recipe.train` with kernels="auto"
  unsloth-bf16/-8bit/-4bit  Unsloth's own recommended path (benchmarks/unsloth_run.py; its
                   wheels: benchmarks/gpu_wheels_unsloth.sh); only when named in --recipes

Every recipe gets the same batches: llamalora's seeded, length-grouped order (for the HF Trainer
recipes through a sequential sampler). Real (non-padding) tokens per step are then the same for all,
and the tokens/s ratio is the step-time ratio. The old recipe pads to 512 whatever the order, so
its speed doesn't depend on it; the plain HF recipes get what HF's group_by_length would give.

Prints one markdown table (median step time and real tokens/s over the steps after --skip, peak
GPU memory, final loss, ratio to `old`) and its numbers as one JSON line; --json-out gets every
number, per-step rows included. Each run's output goes to a log of its own (--log-dir).

`--numerics` instead trains llamalora with kernels="fast" and kernels="plain" for 50 steps at each
quantization and compares the loss curves (target: within 2%), then loads the fast run's adapter
with plain `peft.PeftModel.from_pretrained` on a plain bitsandbytes base and compares its eval loss
on the held-out records with the one llamalora reported (target: within 1%).

The default data is generated here (see `make_data`); `--data FILE` takes any instruction file.
With --resume, the successful runs of the work dir's last report with the same setup and code are
kept and only the rest run (see benchmarks/gpu_speed.sh, whose calls are cut at 10 minutes).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
sys.path.insert(0, str(ROOT / "benchmarks"))  # harness.py, also when this file is loaded by path

from harness import (LEARNING_RATE, LORA, RECORDS_PER_STEP, load_records,  # noqa: E402
                     peak_gib, step_batches, step_clock, versions)

SPEED_RECIPES = {
    "old": "HF Trainer, 8-bit, fp16, 2x2, padded to max length, checkpointing",
    "hf-8bit": "HF Trainer + PEFT, 8-bit, bf16, 4x1, padded to the longest",
    "hf-4bit": "HF Trainer + PEFT, NF4, bf16, 4x1, padded to the longest",
    "hf-bf16": "HF Trainer + PEFT, bf16, 4x1, padded to the longest",
    "hf-packed-bf16": "HF Trainer + PEFT, bf16, 2x2, padding-free, gradient checkpointing",
    "hf-packed-8bit": "HF Trainer + PEFT, 8-bit, bf16, 2x2, padding-free, gradient checkpointing",
    "llamalora-8bit": "llamalora train, 8-bit",
    "llamalora-4bit": "llamalora train, 4-bit",
    "llamalora-none": "llamalora train, bf16",
    "unsloth-bf16": "Unsloth, bf16, its recommended path (benchmarks/unsloth_run.py)",
    "unsloth-8bit": "Unsloth, 8-bit, its recommended path (benchmarks/unsloth_run.py)",
    "unsloth-4bit": "Unsloth, 4-bit, its recommended path (benchmarks/unsloth_run.py)",
}
# Unsloth's recipes need its own wheels (benchmarks/gpu_wheels_unsloth.sh): asked for by name.
DEFAULT_RECIPES = [r for r in SPEED_RECIPES if not r.startswith("unsloth-")]
NUMERICS_QUANTS = ("8bit", "4bit", "none")
LOSS_CURVE_TARGET = 0.02  # issue 5: fast kernels' loss curve within 2% of plain bitsandbytes'
EVAL_LOSS_TARGET = 0.01  # and the adapter's eval loss on plain transformers + peft within 1%
# A --resume keeps earlier runs only when these match.
RESUME_KEYS = ("mode", "model", "device", "data_sha256", "code_sha256", "steps",
               "max_seq_length", "seed", "memory_cap_gib")
PAD_ID = 128004  # <|finetune_right_pad_id|>, what llamalora pads with
# The old script's int8 layers skip lm_head and the vision parts (llamalora/models.py keeps the
# same list: transformers 5 matches dotted prefixes, older versions bare names).
SKIP_MODULES = ["lm_head", "model.vision_model", "model.multi_modal_projector", "vision_model",
                "multi_modal_projector"]


# --- the default data ------------------------------------------------------------------------
# A construction glossary like data/sample.jsonl, but larger and with its own phrase pools, so
# editing the sample never changes the benchmark. About 3 in 4 records are short entries (20-80
# tokens in the training format); the rest are long answers of 200-600 tokens, a few over 512.

KO_TERMS = [
    ("거푸집", "콘크리트를 부어 원하는 모양으로 굳히기 위해 임시로 설치하는 틀입니다."),
    ("철근", "콘크리트의 약한 인장강도를 보완하기 위해 콘크리트 속에 넣는 강재 봉입니다."),
    ("타설", "비빈 콘크리트를 거푸집 안에 부어 넣는 작업입니다."),
    ("양생", "타설한 콘크리트가 강도를 얻도록 온도와 습도를 유지하고 보호하는 일입니다."),
    ("비계", "높은 곳에서 작업하기 위해 임시로 설치하는 작업 발판과 통로 구조물입니다."),
    ("슬래브", "바닥이나 지붕을 이루는 얇고 넓은 판 모양의 부재입니다."),
    ("기초", "건물의 하중을 지반에 안전하게 전달하는 최하부 구조입니다."),
    ("말뚝", "상부 하중을 깊은 곳의 단단한 지층까지 전달하는 기둥 모양의 부재입니다."),
    ("흙막이", "굴착면 주변의 흙이 무너지지 않도록 지지하는 구조물입니다."),
    ("방수", "물과 습기가 구조물 안으로 스며들지 않도록 막는 공사입니다."),
    ("조적", "벽돌이나 블록을 모르타르로 붙여 쌓아 벽체를 만드는 공사입니다."),
    ("다짐", "흙이나 콘크리트의 공극을 줄여 밀도를 높이는 작업입니다."),
    ("동바리", "콘크리트가 굳을 때까지 거푸집을 아래에서 받치는 임시 지주입니다."),
    ("먹매김", "도면에 따라 바닥과 벽에 기준선과 위치를 표시하는 작업입니다."),
    ("피복두께", "콘크리트 표면에서 가장 가까운 철근까지의 콘크리트 두께입니다."),
    ("되메우기", "지하 공사가 끝난 뒤 파낸 자리를 흙으로 다시 채우는 작업입니다."),
    ("콜드조인트", "먼저 친 콘크리트가 굳은 뒤 이어 쳐서 생긴 불연속 이음면입니다."),
    ("레미콘", "공장에서 배합해 트럭으로 현장까지 운반하는 굳지 않은 콘크리트입니다."),
    ("블리딩", "타설 후 물이 콘크리트 윗면으로 떠오르는 현상입니다."),
    ("전단벽", "지진이나 바람 같은 수평하중에 저항하도록 설계한 벽입니다."),
    ("앵커볼트", "기둥이나 설비를 기초에 고정하기 위해 콘크리트에 묻는 볼트입니다."),
    ("미장", "벽이나 바닥에 모르타르를 발라 평탄하게 마무리하는 작업입니다."),
    ("터파기", "기초나 지하층을 만들기 위해 땅을 파내는 작업입니다."),
    ("배근", "설계도에 따라 철근을 배치하고 결속하는 작업입니다."),
    ("신축이음", "온도 변화에 따른 팽창과 수축을 흡수하도록 두는 이음입니다."),
    ("데크플레이트", "보 위에 깔아 슬래브 거푸집 역할을 하는 골 모양 강판입니다."),
    ("가설공사", "본 공사를 위해 임시로 설치했다가 철거하는 시설 공사입니다."),
    ("하자보수", "준공 후 하자담보책임기간에 발견된 결함을 고치는 일입니다."),
]
EN_TERMS = [
    ("formwork", "a temporary mould that holds fresh concrete in shape until it hardens."),
    ("rebar", "a steel bar placed in concrete to carry tensile forces."),
    ("curing", "keeping new concrete moist and warm enough so that it gains strength."),
    ("scaffolding", "a temporary platform structure that gives workers safe access at height."),
    ("footing", "the enlarged base of a foundation that spreads a load over the soil."),
    ("shoring", "a temporary support system that holds up formwork or an excavation."),
    ("masonry", "construction from bricks, blocks or stone bonded with mortar."),
    ("compaction", "pressing soil or concrete to remove voids and raise its density."),
    ("concrete cover", "the thickness of concrete between the surface and the nearest bar."),
    ("backfilling", "refilling an excavation with compacted soil after underground work."),
    ("cold joint", "a weak plane formed when fresh concrete meets concrete that has set."),
    ("slump", "a measure of the consistency of fresh concrete, taken with a cone."),
    ("laitance", "a weak, milky layer of fine particles on the surface of fresh concrete."),
    ("shear wall", "a wall designed to resist lateral loads from wind and earthquakes."),
    ("curtain wall", "a non-load-bearing exterior wall hung from the building frame."),
    ("deck plate", "a profiled steel sheet that serves as permanent formwork for a slab."),
    ("anchor bolt", "a bolt cast into concrete to fix a column or machine to its base."),
    ("lap splice", "two bars overlapped over a set length so force passes between them."),
    ("punch list", "a list of unfinished or defective items to fix before handover."),
    ("shop drawing", "a detailed drawing made by a fabricator to show how a part is built."),
    ("water-cement ratio", "the mass of water divided by the mass of cement in a mix."),
    ("grout", "a fluid mortar used to fill gaps, joints and ducts."),
    ("post-tensioning", "stressing steel tendons after the concrete has hardened."),
    ("bearing capacity", "the greatest pressure the ground can carry without failing."),
    ("expansion joint", "a gap that lets parts of a structure move as temperature changes."),
    ("precast concrete", "concrete elements cast in a factory and then set in place."),
    ("damp-proof course", "a barrier in a wall that stops moisture rising from the ground."),
    ("excavation", "digging out soil and rock to make room for foundations."),
]
# Korean-English pairs of the two lists above, for translation entries.
TRANSLATIONS = [("거푸집", "formwork"), ("철근", "rebar"), ("양생", "curing"),
                ("비계", "scaffolding"), ("동바리", "shoring"), ("조적", "masonry"),
                ("다짐", "compaction"), ("피복두께", "concrete cover"), ("되메우기", "backfilling"),
                ("콜드조인트", "cold joint"), ("전단벽", "shear wall"), ("데크플레이트", "deck plate"),
                ("앵커볼트", "anchor bolt"), ("신축이음", "expansion joint"), ("터파기", "excavation")]
KO_ASK = ["다음 건설 용어를 설명하세요.", "다음 건설 용어의 뜻을 간단히 설명해 주세요.",
          "현장에서 쓰는 다음 용어가 무엇인지 알려 주세요.", "이 용어를 한 문장으로 정의하세요."]
EN_ASK = ["Define the construction term.", "Explain this term briefly.",
          "What does the following term mean on a construction site?",
          "Give a one-sentence definition."]
KO_EXTRA = ["현장에서 자주 쓰는 용어입니다.", "시공 전에 도면과 시방서를 확인해야 합니다.",
            "품질 검사에서 자주 확인하는 항목입니다.", "안전 관리와도 밀접하게 관련됩니다.",
            "감리자가 시공 상태를 점검합니다.", "공정표에 따로 일정을 잡아 관리합니다.",
            "계절과 날씨에 따라 주의할 점이 달라집니다.", ""]
EN_EXTRA = ["It is checked during site inspections.", "The drawings give the exact details.",
            "Poor workmanship here often causes defects later.",
            "The specifications set the tolerances.", "It is planned in the schedule.",
            "Weather can affect how it is done.", ""]
SYSTEMS = ["건설 용어 도우미입니다.", "You explain construction terminology accurately.", None,
           None, None]
KO_TOPICS = ["콘크리트 타설 절차", "거푸집 해체 시기와 방법", "철근 배근 검사", "동절기 양생 관리",
             "흙막이 공사 순서", "방수 공사 하자 예방", "비계 설치 안전 수칙", "말뚝 시공 절차"]
EN_TOPICS = ["placing concrete", "removing formwork safely", "inspecting rebar before a pour",
             "curing concrete in cold weather", "building an excavation support system",
             "preventing waterproofing defects", "erecting scaffolding safely",
             "driving precast piles"]
KO_STEPS = [
    "먼저 작업 범위와 도면을 확인하고 필요한 자재와 장비를 준비합니다.",
    "작업 전 안전 교육을 실시하고 개인 보호구 착용 상태를 점검합니다.",
    "기준점과 레벨을 측량해 시공 위치를 정확하게 표시합니다.",
    "자재가 반입되면 규격과 품질 시험 성적서를 확인합니다.",
    "시공 중에는 감리자의 검측을 받고 결과를 기록으로 남깁니다.",
    "날씨와 기온을 확인해 작업 시간을 조정하고 필요한 보양 조치를 합니다.",
    "장비 작업 반경 안에는 출입을 통제하고 신호수를 배치합니다.",
    "이음부와 모서리처럼 결함이 생기기 쉬운 부위를 특히 꼼꼼히 확인합니다.",
    "작업이 끝나면 주변을 정리하고 남은 자재를 분류해 보관합니다.",
    "발견된 결함은 사진과 함께 기록하고 보수 방법을 정해 조치합니다.",
    "공정별 검사 결과를 다음 공정 담당자에게 전달합니다.",
    "시방서에서 정한 허용 오차를 넘지 않는지 측정해 확인합니다.",
    "다음 공정으로 넘어가기 전에 필요한 강도나 건조 상태를 확보했는지 확인합니다.",
    "작업 일보에 투입 인원, 장비, 작업량을 기록합니다.",
    "소음과 분진이 인근 주민에게 피해를 주지 않도록 관리합니다.",
    "비가 오거나 바람이 강하면 작업을 중지하고 안전을 우선합니다.",
]
EN_STEPS = [
    "Check the drawings and the scope of work, and prepare the materials and equipment.",
    "Hold a safety briefing and make sure everyone wears the right protective equipment.",
    "Survey the reference points and levels, and mark the exact positions on site.",
    "When materials arrive, check their grades and the supplier's test certificates.",
    "During the work, ask the supervisor to inspect each stage and keep a written record.",
    "Watch the weather and the temperature, and adjust the working hours or protection.",
    "Keep people out of the working radius of heavy equipment and assign a signaller.",
    "Pay special attention to joints and corners, where defects are most likely to appear.",
    "When the work is finished, clear the area and sort and store the leftover materials.",
    "Record any defect with photographs, agree on a repair method and carry it out.",
    "Pass the inspection results of each stage to the crew of the next stage.",
    "Measure the finished work and confirm that it is within the specified tolerances.",
    "Before the next stage starts, confirm that the required strength or dryness is reached.",
    "Write the crew size, equipment and quantities of the day in the site diary.",
    "Control noise and dust so that neighbours are not disturbed.",
    "Stop work in heavy rain or strong wind and put safety first.",
]


SHORT_TOKENS = (45, 105)  # a short record's training length


def _training_length(tokenizer, record: dict) -> int:
    """Tokens of a record in the training format (the template llamalora trains on)."""
    from llamalora.template import render_segments, user_text
    from llamalora.tokenizer import encode_segments

    text = user_text(record["instruction"], record.get("input", ""))
    segments = render_segments(record.get("system"), [("user", text),
                                                      ("assistant", record["output"])])
    return sum(len(ids) for ids, _ in encode_segments(tokenizer, [segments])[0])


def _short_record(rng: random.Random) -> dict:
    kind = rng.random()
    if kind < 0.45:
        term, meaning = rng.choice(KO_TERMS)
        out = f"{meaning} {rng.choice(KO_EXTRA)}".strip()
        record = {"instruction": rng.choice(KO_ASK), "input": term, "output": out}
    elif kind < 0.85:
        term, meaning = rng.choice(EN_TERMS)
        out = f"{term[0].upper() + term[1:]} is {meaning} {rng.choice(EN_EXTRA)}".strip()
        record = {"instruction": rng.choice(EN_ASK), "input": term, "output": out}
    else:  # translations both ways, as in the sample glossary
        ko, en = rng.choice(TRANSLATIONS)
        if rng.random() < 0.5:
            record = {"instruction": "Translate this construction term into English.",
                      "input": ko, "output": f"{en[0].upper() + en[1:]}: {dict(EN_TERMS)[en]}"}
        else:
            record = {"instruction": "Translate this construction term into Korean.",
                      "input": en, "output": f"{ko}: {dict(KO_TERMS)[ko]}"}
    system = rng.choice(SYSTEMS)
    if system:
        record = {"system": system, **record}
    return record


def _long_record(rng: random.Random, tokenizer, target: int) -> dict:
    korean = rng.random() < 0.5
    topic = rng.choice(KO_TOPICS if korean else EN_TOPICS)
    if korean:
        record = {"instruction": f"{topic}에 대해 단계별로 자세히 설명해 주세요.", "input": "",
                  "output": f"{topic}의 순서는 다음과 같습니다."}
    else:
        record = {"instruction": f"Explain step by step how to go about {topic}.", "input": "",
                  "output": f"Here is how {topic} is usually done on site."}
    pool = list(KO_STEPS if korean else EN_STEPS)
    used = number = 0
    # Sentences in a fresh random order until the record reaches its target length; most start
    # a numbered step, the rest continue the one before. The pool is reshuffled when it runs out,
    # so long targets are reachable.
    while _training_length(tokenizer, record) < target:
        if used % len(pool) == 0:
            rng.shuffle(pool)
        sentence = pool[used % len(pool)]
        used += 1
        if number == 0 or rng.random() < 0.7:
            number += 1
            record["output"] += f"\n{number}. {sentence}"
        else:
            record["output"] += f" {sentence}"
    return record


def make_data(path: Path, records: int = 1000, seed: int = 0, long_share: float = 0.25,
              max_length: int = 512) -> dict:
    """Writes the default benchmark data (JSONL) and returns its length statistics.

    Deterministic for a given (records, seed): short glossary entries (Korean, English and
    translations) and `long_share` of long step-by-step answers whose target length is drawn
    from 200-500 tokens, or 513-600 for one in ten of them. No two records are the same.
    """
    from llamalora.tokenizer import load_tokenizer

    tokenizer = load_tokenizer("bundled").tokenizer
    rng = random.Random(seed)
    seen: set[str] = set()
    rows: list[tuple[dict, int]] = []
    while len(rows) < records:
        if rng.random() < long_share:
            target = rng.randint(513, 600) if rng.random() < 0.1 else rng.randint(200, 500)
            record = _long_record(rng, tokenizer, target)
        else:
            record = _short_record(rng)
        key = json.dumps(record, ensure_ascii=False, sort_keys=True)
        n = _training_length(tokenizer, record)
        # Short entries outside 45-105 tokens would blur the mix (20-80 before the 25 tokens of
        # the dated system block Meta's template gives every text-only record); duplicates would
        # repeat work.
        if key in seen or (n < 200 and not SHORT_TOKENS[0] <= n <= SHORT_TOKENS[1]):
            continue
        seen.add(key)
        rows.append((record, n))
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r, _ in rows),
                    encoding="utf-8")
    return data_stats([n for _, n in rows], max_length)


def file_stats(path: str, max_length: int) -> dict:
    """data_stats of any data file, in the training format's tokens (bundled tokenizer)."""
    from llamalora.batching import tokenize_examples
    from llamalora.data import load_examples
    from llamalora.tokenizer import load_tokenizer

    examples, _ = load_examples(path)
    tokenized, _ = tokenize_examples(load_tokenizer("bundled").tokenizer, examples,
                                     max_seq_length=1 << 30)
    return data_stats([len(t) for t in tokenized], max_length)


def data_stats(lengths: list[int], max_length: int = 512) -> dict:
    return {"records": len(lengths), "mean_tokens": round(statistics.mean(lengths), 1),
            "median_tokens": statistics.median(lengths), "max_tokens": max(lengths),
            "long_records": sum(n >= 200 for n in lengths),
            "over_max_length": sum(n > max_length for n in lengths)}


# --- the plain transformers models of the HF recipes (the shared parts: harness.py) -----------

def bnb_config(quant: str, dtype, *, old: bool = False):
    """A plain transformers quantization config (None for bf16), written here, not llamalora's."""
    from transformers import BitsAndBytesConfig

    if quant == "8bit":
        # The old script spelled out LLM.int8's outlier threshold; 6.0 is also the default.
        extra = {"llm_int8_threshold": 6.0} if old else {}
        return BitsAndBytesConfig(load_in_8bit=True, llm_int8_skip_modules=SKIP_MODULES, **extra)
    if quant == "4bit":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4",
                                  bnb_4bit_use_double_quant=True, bnb_4bit_compute_dtype=dtype,
                                  llm_int8_skip_modules=SKIP_MODULES)
    return None


def load_plain_model(spec: dict, quant: str, dtype, *, old: bool = False):
    """`AutoModelForCausalLM` (text-only Mllama) on the chosen device, nothing of llamalora's."""
    from transformers import AutoModelForCausalLM

    from llamalora.models.names import resolve_model

    device = "cuda:0" if spec["device"] == "cuda" else "cpu"
    kwargs = {"dtype": dtype, "device_map": {"": device}}
    config = bnb_config(quant, dtype, old=old)
    if config is not None:
        kwargs["quantization_config"] = config
    return AutoModelForCausalLM.from_pretrained(resolve_model(spec["model"]), **kwargs)


# --- recipe: HF Trainer (the old script, and the plain HF + PEFT counterparts) ----------------

def run_trainer(spec: dict) -> dict:
    """One HF Trainer run; returns per-step rows (time, real tokens, loss) and peak memory."""
    import torch
    from peft import LoraConfig, get_peft_model, prepare_model_for_kbit_training
    from transformers import Trainer, TrainingArguments, set_seed

    old = spec["recipe"] == "old"
    packed = spec["recipe"].startswith("hf-packed-")  # long records: padding-free, checkpointing
    quant = {"old": "8bit", "hf-8bit": "8bit", "hf-4bit": "4bit", "hf-bf16": "none",
             "hf-packed-bf16": "none", "hf-packed-8bit": "8bit"}[spec["recipe"]]
    cuda = spec["device"] == "cuda"
    # The old script trained in fp16; the plain counterparts in bf16, as llamalora does. CPUs
    # have no fp16 autocast, so fp32 there.
    dtype = (torch.float16 if old else torch.bfloat16) if cuda else torch.float32
    # Micro-batch x accumulation: the old 2 x 2, or 4 x 1 like llamalora. Same 4 records a step.
    micro = 2 if old or packed else RECORDS_PER_STEP
    checkpointing = old or packed

    records = load_records(spec, train_on_prompt=old)  # old: labels = the whole text
    batches = step_batches([len(r) for r in records], spec["steps"], spec["seed"])
    # A sequential sampler over records laid out step by step gives the Trainer these batches.
    feed = [{"input_ids": records[i].input_ids, "labels": records[i].labels}
            for batch in batches for i in batch]
    pad_to = spec["max_seq_length"] if old else None

    def collate(features):
        if packed:  # transformers' own padding-free collator: one row, position ids restart
            from transformers import DataCollatorWithFlattening

            return DataCollatorWithFlattening(return_tensors="pt")(features)
        length = pad_to or max(len(f["input_ids"]) for f in features)
        ids = torch.full((len(features), length), PAD_ID, dtype=torch.long)
        labels = torch.full((len(features), length), -100, dtype=torch.long)
        mask = torch.zeros((len(features), length), dtype=torch.long)
        for row, f in enumerate(features):
            n = len(f["input_ids"])
            ids[row, :n] = torch.tensor(f["input_ids"])
            labels[row, :n] = torch.tensor(f["labels"])  # padding stays -100
            mask[row, :n] = 1
        return {"input_ids": ids, "attention_mask": mask, "labels": labels}

    set_seed(spec["seed"])
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = load_plain_model(spec, quant, dtype, old=old)
    if quant != "none":
        # The standard PEFT recipe for a k-bit base (the old script called it too): norms and
        # embeddings to fp32, input grads on; checkpointing only where the recipe uses it.
        model = prepare_model_for_kbit_training(model, use_gradient_checkpointing=checkpointing)
    model = get_peft_model(model, LoraConfig(
        r=LORA["r"], lora_alpha=LORA["alpha"], lora_dropout=LORA["dropout"],
        target_modules=LORA["targets"], bias="none", task_type="CAUSAL_LM"))

    clock = step_clock(cuda)
    # Real tokens are counted where the model consumes a micro-batch (a forward pre-hook), not in
    # the collator, which the data loader runs ahead of the step. The sums stay on the device
    # until the step ends, so counting adds no synchronization inside a step.
    model.register_forward_pre_hook(
        lambda module, args, kwargs: clock.masks.append(
            kwargs["input_ids"].new_tensor(kwargs["input_ids"].numel()) if packed
            else kwargs["attention_mask"].sum()), with_kwargs=True)
    args = TrainingArguments(
        output_dir=spec["output_dir"], per_device_train_batch_size=micro,
        gradient_accumulation_steps=RECORDS_PER_STEP // micro, max_steps=spec["steps"],
        learning_rate=LEARNING_RATE, warmup_steps=0.03, lr_scheduler_type="linear",
        fp16=cuda and old, bf16=cuda and not old, gradient_checkpointing=checkpointing,
        gradient_checkpointing_kwargs={"use_reentrant": False} if checkpointing else None,
        logging_strategy="steps", logging_steps=1, save_strategy="no", eval_strategy="no",
        report_to="none", seed=spec["seed"], train_sampling_strategy="sequential",
        remove_unused_columns=False, dataloader_num_workers=0, disable_tqdm=True,
        use_cpu=not cuda)
    trainer = Trainer(model=model, args=args, train_dataset=feed, data_collator=collate,
                      callbacks=[clock])
    trainer.train()
    return {"rows": clock.rows, "peak_gpu_mem_gib": peak_gib(spec),
            "kernels": "bitsandbytes" if quant != "none" else None,
            "gradient_checkpointing": checkpointing, "versions": versions()}


# --- recipe: llamalora ------------------------------------------------------------------------

def run_llamalora(spec: dict) -> dict:
    """One `llamalora.recipe.train` run; its metrics.jsonl gives the per-step rows."""
    from dataclasses import asdict

    from llamalora.config import TrainConfig
    from llamalora.events import EvalDone, Status, StepDone
    from llamalora.recipe import train

    # The defaults a user gets (batch 2 x accumulation 2, LoRA r 8 on q,k,v,o, automatic
    # compile / CUDA graphs): only what makes the runs comparable is set.
    config = TrainConfig(
        data_path=spec["data"], output_dir=spec["output_dir"], model=spec["model"],
        quant=spec["quant"], max_seq_length=spec["max_seq_length"], max_steps=spec["steps"],
        eval_fraction=spec.get("eval_fraction", 0), save_steps=0, seed=spec["seed"],
        kernels=spec.get("kernels", "auto"), compile=spec.get("compile"),
        cuda_graphs=spec.get("cuda_graphs"), **spec.get("options", {}))
    statuses = []  # what the run said it turned on, and why

    def progress(event) -> None:
        if isinstance(event, Status):
            statuses.append(event.message)
        if isinstance(event, (StepDone, Status, EvalDone)):
            print(type(event).__name__, json.dumps(asdict(event), default=str), file=sys.stderr,
                  flush=True)

    summary = train(config, overwrite=True, on_event=progress).to_dict()
    metrics = Path(spec["output_dir"]) / "metrics.jsonl"
    rows = [json.loads(line) for line in metrics.read_text().splitlines() if line.strip()]
    # .get: which path ran (kernels, batches, checkpointing) is said by keys issue 5 added.
    keys = ("peak_gpu_mem_gib", "kernels", "batches", "gradient_checkpointing", "compiled",
            "final_eval_loss", "versions", "offload_activations")
    return {"rows": [r for r in rows if "loss" in r], **{k: summary.get(k) for k in keys},
            "statuses": statuses, "estimate_gib": plan_estimate(summary)}


def plan_estimate(summary: dict) -> float | None:
    """The plan's estimate for the path a llamalora run took (llamalora.json's result)."""
    plan, quant = summary["plan"], summary["quant"]
    graphs = "CUDA graphs" in (summary.get("batches") or "")
    key = ("estimated_peak_gib_fused" + ("_checkpointed" if summary["gradient_checkpointing"]
                                         else "") if graphs
           else "estimated_peak_gib_offloaded" if summary.get("offload_activations")
           else "estimated_peak_gib_checkpointed" if summary["gradient_checkpointing"]
           else "estimated_peak_gib")
    return plan.get(key, {}).get(quant)


# --- numerics: the adapter on a plain transformers + peft stack -------------------------------

def run_plain_eval(spec: dict) -> dict:
    """Eval loss of a llamalora adapter on a plain bitsandbytes base loaded by transformers.

    The held-out records are the run's own (llamalora's plan of the same config); the forward
    is transformers + peft only: one record at a time (no padding), cross-entropy on the
    response tokens, averaged over tokens as llamalora averages its eval loss.
    """
    import torch
    import torch.nn.functional as F
    from peft import PeftModel

    from llamalora.config import TrainConfig
    from llamalora.plan import plan_training

    plan = plan_training(TrainConfig(
        data_path=spec["data"], output_dir=spec["adapter"], model=spec["model"],
        max_seq_length=spec["max_seq_length"], eval_fraction=spec["eval_fraction"],
        seed=spec["seed"], max_steps=spec["steps"], batch_size=RECORDS_PER_STEP,
        gradient_accumulation_steps=1))
    cuda = spec["device"] == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32  # llamalora's compute dtype
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    model = PeftModel.from_pretrained(load_plain_model(spec, spec["quant"], dtype),
                                      spec["adapter"])
    model.eval()
    device = next(model.parameters()).device
    loss_sum, count = 0.0, 0
    with torch.no_grad():
        for record in plan.eval:
            ids = torch.tensor([record.input_ids], device=device)
            labels = torch.tensor(record.labels[1:], device=device)
            logits = model(input_ids=ids, attention_mask=torch.ones_like(ids)).logits[0, :-1]
            keep = labels != -100
            loss_sum += F.cross_entropy(logits[keep].float(), labels[keep],
                                        reduction="sum").item()
            count += int(keep.sum())
    return {"eval_loss": loss_sum / max(count, 1), "eval_records": len(plan.eval),
            "eval_tokens": count, "peak_gpu_mem_gib": peak_gib(spec)}


def run_unsloth(spec: dict) -> dict:
    """Unsloth's own recommended path on the same records (benchmarks/unsloth_run.py)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from unsloth_run import run

    return run(spec)


CHILD_KINDS = {"trainer": run_trainer, "llamalora": run_llamalora, "plain-eval": run_plain_eval,
               "unsloth": run_unsloth}


def child_main(spec_path: Path, result_path: Path) -> int:
    """Runs one spec in this process and writes its result (or its error) as JSON."""
    spec = json.loads(spec_path.read_text())
    t0 = time.perf_counter()
    try:
        if spec.get("memory_cap_gib"):  # a smaller card, stood in for on this one
            import torch

            total = torch.cuda.get_device_properties(0).total_memory
            torch.cuda.set_per_process_memory_fraction(
                min(1.0, spec["memory_cap_gib"] * 2**30 / total))
        result = CHILD_KINDS[spec["kind"]](spec)
    except Exception as exc:  # noqa: BLE001 (an OOM or a crash of one recipe is a result)
        traceback.print_exc()
        first_line = (str(exc).strip().splitlines() or [""])[0][:300]
        result = {"error": f"{type(exc).__name__}: {first_line}".rstrip(": ")}
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result_path.write_text(json.dumps(result))
    return 0


# --- the parent: each spec in a fresh process, results saved as they come --------------------

def run_child(spec: dict, work: Path, log_dir: Path, name: str) -> dict:
    """Runs one spec in a subprocess; its output goes to log_dir/NAME.log."""
    spec_path, result_path = work / f"{name}.spec.json", work / f"{name}.result.json"
    spec_path.write_text(json.dumps(spec))
    result_path.unlink(missing_ok=True)
    env = dict(os.environ)
    if spec["device"] == "cpu":
        env["CUDA_VISIBLE_DEVICES"] = ""  # llamalora's train picks the GPU whenever it sees one
    if spec.get("pythonpath"):  # packages for this run alone (Unsloth's datasets 4.x)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [spec["pythonpath"],
                                                          env.get("PYTHONPATH")]))
    log = log_dir / f"{name}.log"
    with log.open("w") as out:
        rc = subprocess.run([sys.executable, __file__, "--child", str(spec_path), str(result_path)],
                            stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT,
                            check=False).returncode
    if result_path.is_file():
        return json.loads(result_path.read_text())
    # Killed (host memory, a signal) before it could write a result.
    tail = log.read_text(errors="replace").strip().splitlines()[-1:] or [""]
    return {"error": f"exit code {rc}: {tail[0][:300]}"}


def speed_specs(args, work: Path, data: str) -> dict[str, dict]:
    specs = {}
    for recipe in args.recipes:
        spec = {"recipe": recipe, "data": data, "model": args.model, "device": args.device,
                "steps": args.steps, "seed": args.seed, "max_seq_length": args.max_seq_length,
                "output_dir": str(work / recipe), "memory_cap_gib": args.memory_cap_gib}
        if recipe.startswith("llamalora-"):
            # The defaults: llamalora picks compile / CUDA graphs itself; the first steps'
            # capture (or compile) time is kept in the per-step rows.
            spec.update(kind="llamalora", quant=recipe.split("-", 1)[1], kernels="auto")
        elif recipe.startswith("unsloth-"):
            spec.update(kind="unsloth", quant=recipe.split("-", 1)[1],
                        pythonpath=args.unsloth_site)
        else:
            spec["kind"] = "trainer"
        specs[recipe] = spec
    return specs


def numerics_specs(args, work: Path, data: str) -> dict[str, dict]:
    specs = {}
    for quant in args.quants:
        base = {"kind": "llamalora", "data": data, "model": args.model, "device": args.device,
                "steps": args.numerics_steps, "seed": args.seed, "quant": quant,
                "max_seq_length": args.max_seq_length, "eval_fraction": 0.05}
        for kernels in ("fast", "plain"):
            # plain = bitsandbytes' own layers, eagerly: the reference the fast paths (their
            # kernels and CUDA graphs) are held to
            specs[f"{quant}-{kernels}"] = {**base, "kernels": kernels,
                                           "cuda_graphs": False if kernels == "plain" else None,
                                           "output_dir": str(work / f"numerics-{quant}-{kernels}")}
        # The fast run's adapter, evaluated by transformers + peft alone.
        specs[f"{quant}-plain-peft"] = {**base, "kind": "plain-eval", "after": f"{quant}-fast",
                                        "adapter": str(work / f"numerics-{quant}-fast")}
    return specs


def code_sha256() -> str:
    """One hash of llamalora's sources and this script: a --resume never mixes code versions."""
    h = hashlib.sha256()
    for path in sorted([*(ROOT / "llamalora").rglob("*.py"), Path(__file__).resolve()]):
        h.update(str(path.relative_to(ROOT)).encode() + b"\0" + path.read_bytes())
    return h.hexdigest()


def run_specs(specs: dict[str, dict], report: dict, previous: dict, work: Path, log_dir: Path,
              save) -> None:
    """Runs the specs in order into report["runs"], saving the report after each.

    Successful runs in `previous` (a --resume of the same setup and code) are kept, not rerun,
    and so are those of other recipes: on the lent GPUs one command may run at most 10 minutes,
    so a full benchmark takes several calls, each with some of the recipes.
    """
    runs = report["runs"]
    runs.update({k: v for k, v in previous.items() if k not in specs and "error" not in v})
    for name, spec in specs.items():
        t0 = time.perf_counter()
        if name in previous and "error" not in previous[name]:
            runs[name] = previous[name]
            print(f"[speed] {name}: kept from the previous report", file=sys.stderr)
            continue
        after = spec.get("after")
        if after and "error" in runs.get(after, {}):
            runs[name] = {"error": f"not run: {after} failed"}
        else:
            print(f"[speed] {name} ...", file=sys.stderr, flush=True)
            runs[name] = run_child(spec, work, log_dir, name)
        print(f"[speed] {name}: {runs[name].get('error') or 'ok'} "
              f"({time.perf_counter() - t0:.0f} s, log {log_dir / (name + '.log')})",
              file=sys.stderr, flush=True)
        save(report)


def summarize(rows: list[dict], skip: int) -> dict:
    """Median step time and real tokens/s over the steps after `skip` (all steps if fewer)."""
    counted = rows[skip:] or rows
    seconds = sum(r["step_time_s"] for r in counted)
    tokens = sum(r["tokens"] for r in counted)
    losses = [r["loss"] for r in rows if r.get("loss") is not None]
    median = statistics.median(r["step_time_s"] for r in counted)
    # Every recipe takes RECORDS_PER_STEP records a step (batches may group them differently),
    # so records/s is the unit that compares them.
    return {"steps_run": len(rows), "steps_counted": len(counted),
            "median_step_s": round(median, 4),
            "records_per_s": round(RECORDS_PER_STEP / median, 2) if median > 0 else None,
            "first_step_s": round(rows[0]["step_time_s"], 2) if rows else None,
            "real_tokens_per_s": round(tokens / seconds, 1) if seconds > 0 else None,
            "real_tokens_counted": tokens, "final_loss": losses[-1] if losses else None}


def speed_results(report: dict) -> dict:
    """The speed table's numbers, from the raw runs."""
    recipes = {}
    for name in [n for n in SPEED_RECIPES if n in report["runs"]]:
        run = report["runs"][name]
        keep = {k: run[k] for k in ("error", "peak_gpu_mem_gib", "kernels", "batches",
                                    "gradient_checkpointing", "wall_s") if k in run}
        if "error" not in run:
            keep.update(summarize(run["rows"], report["skip"]))
        recipes[name] = keep
    old = recipes.get("old", {}).get("records_per_s")
    for r in recipes.values():
        ours = r.get("records_per_s")
        r["ratio_to_old"] = round(ours / old, 2) if ours and old else None
    # The same records in every step is what makes the ratios step-time ratios; say if not.
    tokens = {tuple(x["tokens"] for x in run["rows"]) for run in report["runs"].values()
              if "rows" in run}
    return {"recipes": recipes, "same_tokens_per_step": len(tokens) <= 1}


def numerics_results(report: dict) -> dict:
    """Loss-curve and eval-loss differences per quantization, from the raw runs."""
    runs, rows = report["runs"], {}
    for quant in [q for q in NUMERICS_QUANTS if any(n.startswith(q + "-") for n in runs)]:
        fast, plain = runs.get(f"{quant}-fast", {}), runs.get(f"{quant}-plain", {})
        check = runs.get(f"{quant}-plain-peft", {})
        row = {"fast_kernels": fast.get("kernels"), "plain_kernels": plain.get("kernels")}
        errors = [f"{k}: {r['error']}" for k, r in
                  (("fast", fast), ("plain", plain), ("plain peft", check)) if "error" in r]
        if "rows" in fast and "rows" in plain:
            a, b = [r["loss"] for r in fast["rows"]], [r["loss"] for r in plain["rows"]]
            rel = [abs(x - y) / abs(y) for x, y in zip(a, b)]
            row.update(steps=len(rel), max_rel_loss_diff=max(rel),
                       mean_rel_loss_diff=statistics.mean(rel), fast_final_loss=a[-1],
                       plain_final_loss=b[-1], llamalora_eval_loss=fast["final_eval_loss"])
        if "eval_loss" in check and row.get("llamalora_eval_loss") is not None:
            row.update(plain_peft_eval_loss=check["eval_loss"], eval_records=check["eval_records"],
                       eval_tokens=check["eval_tokens"],
                       eval_rel_diff=abs(row["llamalora_eval_loss"] - check["eval_loss"])
                       / abs(check["eval_loss"]))
        row["within_targets"] = (row.get("max_rel_loss_diff", 1) <= LOSS_CURVE_TARGET
                                 and row.get("eval_rel_diff", 1) <= EVAL_LOSS_TARGET)
        if errors:
            row["error"] = "; ".join(errors)
        rows[quant] = row
    return {"numerics": rows}


# --- printing ----------------------------------------------------------------------------------

def _cell(value, fmt: str = "{}") -> str:
    return "-" if value is None else fmt.format(value)


def header(report: dict) -> str:
    """Two lines above the table: what ran where, and on what data."""
    s, v = report["data_stats"], report["versions"]
    steps = f"{report['steps']} steps"
    if report["mode"] == "speed":
        steps += f", the first {report['skip']} not counted"
    return (f"Model {report['model']} on {report.get('gpu') or report['device']}; torch "
            f"{v['torch']}, transformers {v['transformers']}, peft {v['peft']}, bitsandbytes "
            f"{v['bitsandbytes']}.\nData {Path(report['data']).name}: {s['records']} records, "
            f"mean {s['mean_tokens']} tokens, {s['long_records']} of 200+ tokens, "
            f"{s['over_max_length']} over {report['max_seq_length']}. "
            f"{report['records_per_step']} records per optimizer step, {steps}.\n")


def speed_table(report: dict) -> str:
    lines = [("| recipe | what | kernels | median step (s) | first step (s) | records/s "
              "| real tokens/s | peak GPU memory (GiB) | final loss | records/s vs old |"),
             "|---|---|---|---|---|---|---|---|---|---|"]
    for name, r in report["recipes"].items():
        what = SPEED_RECIPES[name]
        if r.get("batches"):  # llamalora says how it batched and whether it checkpointed
            what += (f" ({r['batches']}; checkpointing "
                     f"{'on' if r.get('gradient_checkpointing') else 'off'})")
        if "error" in r:
            error = r["error"].replace("|", "/")  # a | would end the cell
            lines.append(f"| {name} | {what} | - | failed: {error} | - | - | - | - | - | - |")
            continue
        lines.append(f"| {name} | {what} | {_cell(r.get('kernels'))} | "
                     f"{r['median_step_s']:.3f} | {_cell(r.get('first_step_s'), '{:.2f}')} | "
                     f"{_cell(r.get('records_per_s'), '{:.2f}')} | "
                     f"{_cell(r['real_tokens_per_s'], '{:.1f}')} | "
                     f"{_cell(r.get('peak_gpu_mem_gib'), '{:.2f}')} | "
                     f"{_cell(r['final_loss'], '{:.4f}')} | "
                     f"{_cell(r['ratio_to_old'], '{:.2f}x')} |")
    notes = ["", ("Real tokens are non-padding tokens. `old` trains on prompt and response, "
                  "the others on the response only, so its loss is not comparable.")]
    if not report["same_tokens_per_step"]:
        notes.append("WARNING: the recipes did not see the same real tokens per step; compare "
                     "tokens/s, not step times.")
    return "\n".join(lines + notes)


def numerics_table(report: dict) -> str:
    lines = [("| quant | kernels (fast run / plain run) | steps | max rel. loss diff "
              "| mean rel. loss diff | llamalora eval loss | plain peft eval loss | eval diff "
              "| within targets |"),
             "|---|---|---|---|---|---|---|---|---|"]
    for quant, r in report["numerics"].items():
        ran = f"{_cell(r.get('fast_kernels'))} / {_cell(r.get('plain_kernels'))}"
        verdict = "yes" if r["within_targets"] else "no"
        lines.append(
            f"| {quant} | {ran} | {_cell(r.get('steps'))} | "
            f"{_cell(r.get('max_rel_loss_diff'), '{:.2%}')} | "
            f"{_cell(r.get('mean_rel_loss_diff'), '{:.2%}')} | "
            f"{_cell(r.get('llamalora_eval_loss'), '{:.4f}')} | "
            f"{_cell(r.get('plain_peft_eval_loss'), '{:.4f}')} | "
            f"{_cell(r.get('eval_rel_diff'), '{:.2%}')} | "
            + (f"failed: {r['error'].replace('|', '/')} |" if "error" in r else f"{verdict} |"))
    lines += ["", (f"Targets: loss curves within {LOSS_CURVE_TARGET:.0%} at every step; the "
                   f"eval loss on plain transformers + peft within {EVAL_LOSS_TARGET:.0%} of "
                   "llamalora's.")]
    return "\n".join(lines)


def _parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="/tmp/m11b",
                    help="Model folder (make_random_11b.py writes the 11B), or `tiny`.")
    ap.add_argument("--device", choices=("cuda", "cpu"), default=None,
                    help="Default: cuda when a GPU is visible, else cpu.")
    ap.add_argument("--data", help="Instruction data file (default: generated, see make_data).")
    ap.add_argument("--records", type=int, default=1000, help="Records of the generated data.")
    ap.add_argument("--recipes", nargs="+", choices=list(SPEED_RECIPES),
                    default=DEFAULT_RECIPES, help="Default: all but Unsloth's.")
    ap.add_argument("--steps", type=int, default=16, help="Optimizer steps per recipe.")
    ap.add_argument("--skip", type=int, default=4, help="First steps not counted (warm-up).")
    ap.add_argument("--max-seq-length", type=int, default=512)
    ap.add_argument("--seed", type=int, default=42)
    ap.add_argument("--memory-cap-gib", type=float, default=None,
                    help="Cap each run's GPU memory (torch.cuda.set_per_process_memory_fraction)"
                         ": a smaller card on this one.")
    ap.add_argument("--unsloth-site", default="/tmp/usite",
                    help="Where .whl-unsloth/ is installed (Unsloth's recipes only).")
    ap.add_argument("--numerics", action="store_true",
                    help="Compare kernels=fast with plain, and the adapter on plain peft.")
    ap.add_argument("--numerics-steps", type=int, default=50)
    ap.add_argument("--quants", nargs="+", choices=NUMERICS_QUANTS, default=list(NUMERICS_QUANTS),
                    help="Quantizations --numerics checks.")
    ap.add_argument("--work-dir", type=Path, help="Runs and the generated data (default: temp).")
    ap.add_argument("--log-dir", type=Path, help="One log per run (default: the work dir).")
    ap.add_argument("--json-out", type=Path, help="Write every number here as JSON.")
    ap.add_argument("--resume", action="store_true",
                    help="Keep the successful runs of the work dir's last report of this setup.")
    ap.add_argument("--child", nargs=2, type=Path, metavar=("SPEC", "RESULT"),
                    help=argparse.SUPPRESS)
    return ap


def main() -> None:
    args = _parser().parse_args()
    if args.child:
        sys.exit(child_main(*args.child))

    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    work = args.work_dir or Path(tempfile.mkdtemp(prefix="llamalora-speed-"))
    log_dir = args.log_dir or work
    for folder in (work, log_dir):
        folder.mkdir(parents=True, exist_ok=True)
    if args.data:
        data = str(Path(args.data).resolve())
        stats = file_stats(data, args.max_seq_length)
    else:
        data = str(work / "speed_data.jsonl")
        stats = make_data(Path(data), records=args.records, max_length=args.max_seq_length)
    print(f"[speed] data {data}: {json.dumps(stats)}", file=sys.stderr, flush=True)

    mode = "numerics" if args.numerics else "speed"
    report = {"mode": mode, "model": args.model, "device": args.device, "data": data,
              "data_stats": stats,
              "data_sha256": hashlib.sha256(Path(data).read_bytes()).hexdigest(),
              "code_sha256": code_sha256(),
              "steps": args.numerics_steps if args.numerics else args.steps, "skip": args.skip,
              "max_seq_length": args.max_seq_length, "seed": args.seed,
              "memory_cap_gib": args.memory_cap_gib,
              "records_per_step": RECORDS_PER_STEP, "lora": LORA, "versions": versions()}
    if args.device == "cuda":
        import torch

        report["gpu"] = torch.cuda.get_device_name(0)
    derive = numerics_results if args.numerics else speed_results
    last = work / f"{mode}_report.json"
    previous = {}
    if args.resume and last.is_file():
        before = json.loads(last.read_text())
        if all(before.get(k) == report[k] for k in RESUME_KEYS):
            previous = before["runs"]

    def save(report: dict) -> None:
        # After every run, so a command stopped by a time limit keeps what it measured.
        report.update(derive(report))
        text = json.dumps(report, indent=2) + "\n"
        for path in (last, args.json_out):
            if path is not None:
                path.parent.mkdir(parents=True, exist_ok=True)
                path.write_text(text)

    report["runs"] = {}
    specs = (numerics_specs if args.numerics else speed_specs)(args, work, data)
    run_specs(specs, report, previous, work, log_dir, save)
    save(report)
    print(header(report))
    print(numerics_table(report) if args.numerics else speed_table(report))
    # One JSON line of the table's numbers, as the other benchmark scripts end.
    print(json.dumps(report["numerics"] if args.numerics else report["recipes"]))
    if args.json_out:
        print(f"[speed] wrote {args.json_out}", file=sys.stderr)


if __name__ == "__main__":
    main()
