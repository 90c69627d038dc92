"""Preference data: load rows -> map columns -> render -> tokenize -> truncate -> (cached) pairs.

The stage's modules, in the order a row passes through them: `sources` (files, built-in sets from
`builtin_sets`, the hub -> rows), `formats` (the mapped columns checked; a row -> a prompt and two
responses, or a drop), `split` (train/eval), `tokenizing` (rendered by `prompts`, the one renderer that
inference uses too; tokenized, truncated), `cache`; `pairs` holds what comes out, `prepare` the entry points.

`prepare_data(data, orpo, tokenizer)` turns the recipe's `data:` and `orpo:` sections into tokenized
`TokenizedPair`s (prompt ids; chosen and rejected response ids, the prompt not repeated) for a train
and an eval split, plus `DataStats` for the log. `check_source(data)` is the cheap check run before any
model is loaded: the file exists and is readable, and the mapped columns are in it.

Sources (`data.train.path`, `data.eval.path`): a local `.jsonl`, `.json` (a list of objects, or JSON
lines), `.csv`, `.parquet`, or `.gz` of a text one; `builtin:demo`, `builtin:short-answers` or `builtin:facts` (generated in
code, see `orpo_cli.data.builtin_sets`); a local
directory or anything else is handed to `datasets.load_dataset` (a hub id; offline this fails with a
one-line error that says to download it and point the recipe at a local file).

Formats (`data.format`), each through `data.columns`:

* pairs: prompt / chosen / rejected strings; the prompt may instead be built from columns with
  `data.prompt_template` ("Question: {question}").
* conversational: chosen and rejected are message lists (`role`/`content`). An optional prompt column
  holds the prompt messages; without one the prompt is the longest shared leading run of messages and
  the responses are the remaining final assistant message(s).
* implicit: whole transcripts (HH-RLHF). The prompt is their longest common prefix cut back to a turn
  boundary: just after the last `\\n\\nAssistant:` inside it. With a chat template the `Human:` /
  `Assistant:` turns become user/assistant messages; with `chat_template: none` the raw text is kept.
* sharegpt: a `conversations` list of `{from, value}` plus single-message `chosen` / `rejected`.
* one_to_many: answers joined by `data.separator` in the chosen / rejected columns, expanded into
  pairs by `data.pairing` (zip, or all combinations in row-major order capped by max_pairs_per_row).

Rendering (`orpo_cli.data.prompts`, the renderer inference uses too): with a chat template (`auto` uses the
tokenizer's, a Jinja string is set on the tokenizer so that it is saved with the run), the prompt text is
the template applied to the prompt messages with `add_generation_prompt=True`, and a response text is the
template applied to prompt + reply with that prompt text cut off its front. Where the template moves a
system message once a reply follows (Mistral's put it in the last message if that is the user's), the
response is cut the same way from the turns without the system message; the prompt keeps it, as
inference renders it. Without a template, the prompt is `system + "\\n\\n" + prompt` (a multi-turn
prompt becomes a `Human:`/`Assistant:` transcript) and a response is the reply text, joined as-is.
A row the template refuses (Gemma-2 has no system role; Mistral's and Gemma's templates raise on roles
that do not alternate, as in 9 of HH-RLHF's 2,312 test transcripts) is dropped, counted under the
template's own reason; when nothing is left the error names that reason.

Special tokens, exactly once:

* BOS starts the prompt when the tokenizer has one and the model family uses one (the tokenizer adds
  it to `tokenizer("a")`, or its chat template emits it), unless the rendered prompt already starts
  with it. Phi-3: `tokenizer("a")` starts with `<s>` and its template does not emit it, so `<s>` is
  prepended. Built-in models: the tokenizer adds nothing, the template emits `<|bos|>`, so nothing is
  added with the template and `<|bos|>` is prepended to plain-text prompts.
* EOS ends each response unless it already does. A template's trailing whitespace after an EOS it
  emitted is dropped, so a built-in response ends `...reply<|end|>` (`<|end|>` is its EOS), not
  `...<|end|>\\n<|end|>`. Phi-3's template closes a turn with `<|end|>\\n` while its EOS is
  `<|endoftext|>`, so a Phi-3 response ends `...reply<|end|>\\n<|endoftext|>`, which is what Phi-3's
  original template rendered for a finished conversation: generation stops at either `<|end|>`
  (Phi-3's generation_config) or the EOS.

Tokenization is batched, `add_special_tokens=False`. A response's ids are the tail of the tokenized
prompt + response text (so a response is tokenized as it follows its prompt, e.g. without the
SentencePiece word-start `▁` it would get alone); only where that tokenization does not start with
the prompt's own ids (a merge across the boundary) is the response tokenized alone.

Truncation, as in the paper's code and TRL: a prompt longer than `orpo.max_prompt_length` loses its
LEFT part (a leading BOS is kept); each response is then cut from the right to
`orpo.max_length - len(prompt)`. Nothing exceeds max_length, and no response becomes empty: a pair whose
responses cannot keep a token is dropped. Dropped pairs are counted by reason: empty field,
chosen == rejected (rendered texts), no shared prompt, cannot fit, chosen == rejected after truncation.
A value of the wrong type (a number where text is expected) is a UserError, not a drop. Row numbers
in messages count from 1 in the source.

Split: without `data.eval`, `data.eval_ratio` of the rows (at least one when the ratio is > 0 and
there are two rows) go to eval, chosen by a shuffle with `data.seed`. Rows are split before
one_to_many expansion and grouped by prompt, so no prompt is in both splits.

Cache: the result is stored under `cache_dir` (default `$ORPO_TUNE_CACHE/data`, else
`~/.cache/orpo-tune/data`) as safetensors of flat int32 ids + int64 offsets (no pickle), written to a
temporary file and renamed into place. The key hashes the source bytes (or builtin name / hub id,
subset and split), every data setting, max_length / max_prompt_length and the tokenizer (serialized
vocab, merges, special tokens, chat template).
"""
