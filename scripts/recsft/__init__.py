"""recsft: LoRA fine-tuning of chat models for Yes/No movie recommendation.

One module per pipeline stage; a module imports only its own stage or earlier ones (tests/test_structure.py):

* foundation -- ``config`` (the one source of defaults), ``io`` (files, atomic writes), ``runtime`` (CPU threads,
  dtype choice), ``cli`` (entry point),
  ``metrics`` (the one Yes/No extractor and metrics function)
* prompt     -- ``formatting`` (record formats, prompt text, chat-template rendering, dataset loading),
  ``movielens`` (MovieLens-100K -> records)
* tokens     -- ``preprocess`` (tokenization, label masking, the dataset cache, training datasets)
* model      -- ``modeling`` (device, tokenizer, model, LoRA), ``inference`` (batched generation and scoring)
* train      -- ``training`` (the trainer, callbacks, resume)
* score      -- ``evaluation`` (predictions and metrics on a dataset, thresholds, mode comparison)
* report     -- ``report`` (figures, metric lines, prediction files, the training summary)
"""

from .runtime import quiet_known_warnings

quiet_known_warnings()  # library messages a user cannot act on (recsft.runtime)
