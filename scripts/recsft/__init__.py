"""recsft: LoRA fine-tuning of chat models for Yes/No movie recommendation.

One module per pipeline stage; a module imports only its own stage or earlier ones (tests/test_structure.py).
Scripts import the package through ``scripts/utils.py``, which re-exports its public names.

* foundation -- ``config`` (the one source of defaults), ``io`` (files, atomic writes), ``runtime`` (CPU threads,
  dtype choice), ``cli`` (entry point),
  ``metrics`` (the one Yes/No extractor and metrics function)
* prompt     -- ``formatting`` (record formats, prompt text, chat-template rendering, dataset loading),
  ``movielens`` (MovieLens-100K -> records, and a prepared folder read back)
* tokens     -- ``preprocess`` (tokenization, label masking, the dataset cache, training datasets)
* model      -- ``modeling`` (device, tokenizer, model, LoRA), ``inference`` (batched generation and scoring),
  ``cf`` (the collaborative-filtering residual: a Cornac model as arrays, cross-fitted logits, the a/b head)
* train      -- ``trainer`` (RecSFTConfig, the trainer: loss, eval step, metrics, the collator of extra columns),
  ``callbacks`` (log lines, graceful stop, time budget, counters), ``resume`` (every checkpoint/resume rule),
  ``training`` (set-up: launch checks, Trainer arguments from the config, the trainer with its callbacks)
* score      -- ``evaluation`` (predictions and metrics on a dataset, thresholds, mode comparison)
* report     -- ``report`` (figures, metric lines, prediction files, the training summary)
"""

from .runtime import quiet_known_warnings

quiet_known_warnings()  # library messages a user cannot act on (recsft.runtime)
