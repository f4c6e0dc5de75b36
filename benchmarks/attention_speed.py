"""The attention shapes of an image step, timed through each kernel that could run them (GPU).

    python3 benchmarks/attention_speed.py [--json out.json]

Vision tower: Mllama's encoder attends over all 4 tile slots of an image at once (4 x 1608
tokens, 16 heads of 80) with a mask that hides a padding token from another padding token only;
real tokens see everything. Timed: SDPA with that mask on the memory-efficient kernel (what runs
today), on cuDNN's, and split into unmasked flash calls (every query over every key, then the
padding queries again over the real keys only). Cross-attention (text queries over a packed
row's image tokens, block-diagonal by record): the whole row with its mask (memory-efficient and
cuDNN kernels) against one call per record, and against one varlen flash call whose record
bounds are device tensors (with the masked row, the shape-static candidates a CUDA graph of an
image step could hold), and the dense mask with the keys and values at their own 8 heads
(`enable_gqa`). Each against fp32 math; forward (and forward + backward where the step needs it).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--json")
    args = ap.parse_args()

    import torch
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    dev = torch.device("cuda")
    torch.manual_seed(0)
    results = {"torch": torch.__version__, "device": torch.cuda.get_device_name()}

    def timed(fn, reps=10):
        fn()
        torch.cuda.synchronize()
        ts = []
        for _ in range(reps):
            t0 = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            ts.append(time.perf_counter() - t0)
        return round(statistics.median(ts) * 1000, 3)

    def host_time(fn, reps=10):  # the host's part of a call: the GPU idle before, no wait after
        ts = []
        for _ in range(reps):
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            fn()
            ts.append(time.perf_counter() - t0)
        torch.cuda.synchronize()
        return round(statistics.median(ts) * 1000, 3)

    # --- vision tower self-attention -----------------------------------------------------------
    tiles_per_image = [1, 2, 4, 3]
    n, heads, dim, patches, slot = len(tiles_per_image), 16, 80, 1601, 1608
    length = 4 * slot
    real = torch.zeros(n, length, dtype=torch.bool, device=dev)
    for i, t in enumerate(tiles_per_image):
        for tile in range(t):
            real[i, tile * slot:tile * slot + patches] = True
    pad = ~real
    mask = (pad[:, :, None] & pad[:, None, :]).to(torch.bfloat16) * torch.finfo(torch.bfloat16).min
    mask = mask[:, None]
    q, k, v = (torch.randn(n, heads, length, dim, device=dev, dtype=torch.bfloat16)
               for _ in range(3))
    with sdpa_kernel(SDPBackend.MATH):
        ref = F.scaled_dot_product_attention(q.float(), k.float(), v.float(),
                                             attn_mask=mask.float())

    def masked(backend):
        def run():
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return run

    real_idx = [real[i].nonzero().squeeze(1) for i in range(n)]
    pad_idx = [pad[i].nonzero().squeeze(1) for i in range(n)]

    def split():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            out = F.scaled_dot_product_attention(q, k, v)
            for i in range(n):
                r, p = real_idx[i], pad_idx[i]
                out[i][:, p] = F.scaled_dot_product_attention(
                    q[i][:, p][None], k[i][:, r][None], v[i][:, r][None])[0]
        return out

    def padded(backend, to, with_mask=True):
        # heads of 80 zero-padded to `to`: the same scores (zeros add nothing to q.k), the same
        # output in the first 80 (v's zeros give zeros), at the scale of 80; the padding counted
        def run():
            qp, kp, vp = (F.pad(t, (0, to - dim)) for t in (q, k, v))
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(qp, kp, vp, scale=dim ** -0.5,
                                                     attn_mask=mask if with_mask else None)
            return out[..., :dim]
        return run

    import types

    from llamalora.families.mllama_attention import _vision_attention

    def ours():  # llamalora's: one varlen flash call, the mask's hidden keys never read
        return _vision_attention(types.SimpleNamespace(training=False), q, k, v, mask,
                                 scaling=dim ** -0.5)[0].transpose(1, 2)

    from llamalora.families import mllama_attention as attention

    def on(kernel):  # llamalora's split through a given varlen kernel
        def run():
            return attention._split_by_padding(q, k, v, mask, dim ** -0.5, kernel).transpose(1, 2)
        return run

    def graphed(fn):  # the same call captured once and replayed, as a CUDA-graph step runs it
        def make():
            stream = torch.cuda.Stream()
            stream.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(stream):
                fn()  # compiles and warms up outside the capture
            torch.cuda.current_stream().wait_stream(stream)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                out = fn()
            return lambda: (graph.replay(), out)[1]
        replay = {}

        def run():
            if "r" not in replay:
                replay["r"] = make()
            return replay["r"]()
        return run

    kernels = [("llamalora's split on torch flash", on(attention._flash_varlen)),
               ("llamalora's split on torch flash, graphed",
                graphed(on(attention._flash_varlen)))]
    try:
        import flash_attn.cute.interface as fa4_interface

        kernels += [("llamalora's split on FA4", on(attention._fa4_varlen)),
                    ("llamalora's split on FA4, graphed", graphed(on(attention._fa4_varlen))),
                    ("FA4, no mask (not the same function)",
                     lambda: fa4_interface.flash_attn_func(
                         q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2),
                         softmax_scale=dim ** -0.5)[0].transpose(1, 2))]
    except ImportError as exc:
        results["fa4"] = f"not installed: {exc}"

    vision = {}
    for name, fn in (*kernels, ("llamalora: varlen, real and padding queries apart", ours),
                     ("cudnn, no mask (not the same function)",
                      lambda: _cudnn_plain(q, k, v)),
                     ("efficient (today)", masked(SDPBackend.EFFICIENT_ATTENTION)),
                     ("cudnn", masked(SDPBackend.CUDNN_ATTENTION)), ("flash split", split),
                     ("cudnn, heads padded to 96", padded(SDPBackend.CUDNN_ATTENTION, 96)),
                     ("cudnn, heads padded to 128", padded(SDPBackend.CUDNN_ATTENTION, 128)),
                     ("flash, no mask (not the same function)",
                      lambda: F.scaled_dot_product_attention(q, k, v)),
                     ("cudnn, no mask, padded to 128 (not the same function)",
                      padded(SDPBackend.CUDNN_ATTENTION, 128, with_mask=False))):
        try:
            t0 = time.perf_counter()
            out = fn()
            first = time.perf_counter() - t0
            diff = (out.float() - ref).abs().max().item()
            vision[name] = {"ms": timed(fn), "host_ms": host_time(fn),
                            "max_diff": round(diff, 5), "first_call_s": round(first, 3)}
        except Exception as exc:  # a backend that refuses these shapes
            vision[name] = {"error": str(exc).splitlines()[0][:200]}
    flops = 4 * n * heads * length * length * dim
    for r in vision.values():
        if "ms" in r:
            r["tflops"] = round(flops / r["ms"] / 1e9, 1)
    results["vision_self_attention"] = {"images": n, "tiles": tiles_per_image, "tokens": length,
                                        "per_layer": vision}
    print(json.dumps(results["vision_self_attention"]), flush=True)

    # --- cross-attention in a packed row ---------------------------------------------------------
    records = [(120, 1), (90, 2), (150, 0), (140, 1), (110, 1), (200, 2)]  # (text tokens, images)
    qh, kvh, hd = 32, 8, 128
    tokens = sum(t for t, _ in records)
    keys_per_image = 4 * patches
    n_img = sum(i for _, i in records)
    cmask = torch.full((tokens, n_img * keys_per_image), torch.finfo(torch.bfloat16).min,
                       dtype=torch.bfloat16, device=dev)
    spans, t0_, i0 = [], 0, 0
    for t, imgs in records:
        if imgs:
            cmask[t0_:t0_ + t, i0 * keys_per_image:(i0 + imgs) * keys_per_image] = 0
        spans.append((t0_, t, i0, imgs))
        t0_, i0 = t0_ + t, i0 + imgs
    cmask = cmask[None, None]
    cq = torch.randn(1, qh, tokens, hd, device=dev, dtype=torch.bfloat16, requires_grad=True)
    ck = torch.randn(1, qh, n_img * keys_per_image, hd, device=dev, dtype=torch.bfloat16,
                     requires_grad=True)
    cv = torch.randn_like(ck, requires_grad=True)

    def whole(backward, backend=SDPBackend.EFFICIENT_ATTENTION):
        # on cuDNN, the shape-static candidate a CUDA graph could hold
        def run():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(cq, ck, cv, attn_mask=cmask)
            if backward:
                out.sum().backward()
            return out
        return run

    def per_record(backward):
        def run():
            parts = []
            for s, t, i, imgs in spans:
                if not imgs:
                    parts.append(cq.new_zeros(1, qh, t, hd))
                    continue
                ks = slice(i * keys_per_image, (i + imgs) * keys_per_image)
                with sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION]):
                    parts.append(F.scaled_dot_product_attention(cq[:, :, s:s + t], ck[:, :, ks],
                                                                cv[:, :, ks]))
            out = torch.cat(parts, 2)
            if backward:
                out.sum().backward()
            return out
        return run

    # static shapes too: one varlen flash call over the records that see images, their bounds
    # as device tensors (only the maxima are host ints)
    with_images = [(s, t, i, imgs) for s, t, i, imgs in spans if imgs]
    q_index = torch.cat([torch.arange(s, s + t, device=dev) for s, t, _, _ in with_images])
    k_index = torch.cat([torch.arange(i * keys_per_image, (i + imgs) * keys_per_image,
                                      device=dev) for _, _, i, imgs in with_images])
    cu_q = torch.tensor([0] + [t for _, t, _, _ in with_images], device=dev).cumsum(0).int()
    cu_k = torch.tensor([0] + [imgs * keys_per_image for *_, imgs in with_images],
                        device=dev).cumsum(0).int()
    max_q = max(t for _, t, _, _ in with_images)
    max_k = max(imgs for *_, imgs in with_images) * keys_per_image

    def varlen(backward):
        from torch.nn.attention.varlen import varlen_attn

        def run():
            qs = cq[0].transpose(0, 1).index_select(0, q_index)  # [tokens, heads, dim]
            ks = ck[0].transpose(0, 1).index_select(0, k_index)
            vs = cv[0].transpose(0, 1).index_select(0, k_index)
            part = varlen_attn(qs, ks, vs, cu_q, cu_k, max_q, max_k)
            out = cq.new_zeros(tokens, qh, hd).index_copy(0, q_index, part)
            out = out.transpose(0, 1)[None]
            if backward:
                out.sum().backward()
            return out
        return run

    # the keys and values at their own 8 heads, each shared by 4 query heads (SDPA's enable_gqa),
    # rather than repeated to 32 as transformers does before a masked kernel
    share = qh // kvh
    ck8 = ck.detach()[:, ::share].clone().requires_grad_()
    cv8 = cv.detach()[:, ::share].clone().requires_grad_()

    def whole_gqa(backward, backend=SDPBackend.CUDNN_ATTENTION):
        def run():
            with sdpa_kernel(backend):
                out = F.scaled_dot_product_attention(cq, ck8, cv8, attn_mask=cmask,
                                                     enable_gqa=True)
            if backward:
                out.sum().backward()
            return out
        return run

    cross = {}
    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        a8 = F.scaled_dot_product_attention(cq, ck8.repeat_interleave(share, 1),
                                            cv8.repeat_interleave(share, 1), attn_mask=cmask)
    try:
        out = whole_gqa(False)()
        cross["gqa on cudnn max diff"] = round((out - a8)[:, :, seen_rows(spans, dev)]
                                               .abs().max().item(), 5)
        cross["whole row masked on cudnn, gqa fwd"] = {"ms": timed(whole_gqa(False))}
        cross["whole row masked on cudnn, gqa fwd+bwd"] = {"ms": timed(whole_gqa(True))}
    except Exception as exc:
        cross["whole row masked on cudnn, gqa"] = {
            "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    a, b = whole(False)(), per_record(False)()
    # Rows of a record with no image are fully masked: SDPA gives a mean of values there, which
    # Mllama zeroes afterwards (full_text_row_masked_out_mask); compare the rows that see images.
    seen = seen_rows(spans, dev)
    cross["per-record max diff"] = round((a - b)[:, :, seen].abs().max().item(), 5)
    for name, fn in (("whole row masked fwd", whole(False)), ("per record fwd", per_record(False)),
                     ("whole row masked fwd+bwd", whole(True)),
                     ("per record fwd+bwd", per_record(True)),
                     ("whole row masked on cudnn fwd", whole(False, SDPBackend.CUDNN_ATTENTION)),
                     ("whole row masked on cudnn fwd+bwd", whole(True, SDPBackend.CUDNN_ATTENTION)),
                     ("varlen fwd", varlen(False)), ("varlen fwd+bwd", varlen(True))):
        try:
            out = fn()
            diff = (out.detach() - a.detach())[:, :, seen].abs().max().item()
            cross[name] = {"ms": timed(fn), "max_diff_vs_masked": round(diff, 5)}
        except Exception as exc:  # a kernel this torch lacks or that refuses the shapes
            cross[name] = {"error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    results["cross_attention"] = {"records": records, "image_tokens": n_img * keys_per_image,
                                  "ms": cross}
    print(json.dumps(results["cross_attention"]), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


def _cudnn_plain(q, k, v):
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.CUDNN_ATTENTION):
        return F.scaled_dot_product_attention(q, k, v)


def seen_rows(spans, dev):
    """The text tokens of a row's records that see an image."""
    import torch

    return torch.cat([torch.full((t,), bool(imgs), device=dev) for _, t, _, imgs in spans])


if __name__ == "__main__":
    main()
