"""The data pipeline: records -> cleaned records -> tokenized examples -> planned, collated micro-batches.

    from optrush.data import BatchLoader, build_datasets
    from optrush.data.tokenizer import load_tokenizer      # imports transformers, so not re-exported here

    tokenizer = load_tokenizer("tok/")
    train, evals, report = build_datasets(cfg.data, tokenizer, seed=0)
    loader = BatchLoader(train, strategy="bfd", rows=8, max_length=cfg.data.max_length,
                         pad_id=tokenizer.pad_token_id, seed=0)
    batch = next(loader)

Modules: recipes (synthetic corpus + text template), reader (JSONL/JSON records), sources (Parquet, CSV, text
folders, saved and hub HF datasets; data.on_error), clean (counted filters streamed in bounded memory,
data.clean), neardup (MinHash + LSH), clean_report (`optrush data clean`), tokenizer (BPE training, loading),
formats (record -> Example), examples (Example and the flat int32 Examples store), chat (chat templates,
assistant-only loss), dataset (files -> examples + report), cache (tokenize once, num_proc), pack
(batch planning, collation), stats (padding per strategy), loader (endless resumable stream, prefetch), batch
(the Batch every consumer sees).
"""
from optrush.data.batch import IGNORE_INDEX, Batch
from optrush.data.clean import CleanReport, clean_records, recipe_rules, rules_from_config
from optrush.data.dataset import DataReport, build_datasets
from optrush.data.examples import Examples
from optrush.data.formats import Example, encode_record
from optrush.data.loader import BatchLoader
from optrush.data.pack import collate, plan_batches
from optrush.data.reader import DataError, read_json, read_jsonl, read_records
from optrush.data.sources import Rejects, iter_records
from optrush.data.stats import packing_stats
from optrush.data.recipes import generate_recipes, recipe_completion, recipe_prompt, write_jsonl

__all__ = ["IGNORE_INDEX", "Batch", "BatchLoader", "CleanReport", "DataError", "DataReport", "Example", "Examples",
           "Rejects", "build_datasets", "clean_records", "collate", "encode_record", "generate_recipes",
           "iter_records", "packing_stats", "plan_batches", "read_json", "read_jsonl", "read_records",
           "recipe_completion", "recipe_prompt", "recipe_rules", "rules_from_config", "write_jsonl"]
