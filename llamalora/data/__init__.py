"""Reading and checking training data, in the layouts users have it.

    readers   JSONL / JSON-array files, streamed with line numbers
    tables    parquet, CSV, Arrow, dataset folders and Hub ids, through `datasets`
    sources   which of the two reads a path (`open_source`)
    layouts/  one module per record layout (Alpaca, OpenAI `messages`, ShareGPT/LLaVA
              `conversations`, and the tool-calling forms of both), each detect / check / fix,
              all normalized into one `Example`
    images    where a record's image paths point, and whether the files decode
    scan      one pass over a data set: `validate_file`, `scan_examples`, `load_examples`
    fixing    `--fix`'s cleaned copy
    report    `ValidationReport`, and `Tally`: what was left out or changed, by reason

`validate_file` reports every problem; `load_examples` returns the checked records as `Example`s
(conversations ready for `template.render_segments`) or raises `DataError` carrying the same
problems. No torch here, and `datasets` only for the formats that need it: the `validate` and
`stats` commands must start fast.
"""

from llamalora.data.example import Example
from llamalora.data.images import (MAX_IMAGE_PIXELS, image_error, image_root_folder, read_image,
                                   resolve_image)
from llamalora.data.layouts import LAYOUTS, CheckOptions, check_record
from llamalora.data.problems import ERROR_CODES, WARNING_CODES, Problem
from llamalora.data.readers import MAX_RECORD_BYTES
from llamalora.data.report import Tally, ValidationReport, left_out_note, unreadable_report
from llamalora.data.scan import (DUPLICATE_TRACK_LIMIT, load_examples, require_valid,
                                 scan_examples, validate_file)
from llamalora.data.sources import Source, open_source
from llamalora.data.tables import TABLE_FILES

__all__ = [
    "DUPLICATE_TRACK_LIMIT", "ERROR_CODES", "LAYOUTS", "MAX_IMAGE_PIXELS", "MAX_RECORD_BYTES",
    "TABLE_FILES", "WARNING_CODES", "CheckOptions", "Example", "Problem", "Source", "Tally",
    "ValidationReport", "check_record", "image_error", "image_root_folder", "left_out_note", "load_examples",
    "open_source", "read_image", "require_valid", "resolve_image", "scan_examples",
    "unreadable_report", "validate_file",
]
