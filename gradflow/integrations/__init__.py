"""Drop-in callbacks for the training frameworks people use; each module imports its framework
lazily, so ``import gradflow.integrations`` costs nothing.

- ``gradflow.integrations.lightning.GradflowCallback``: PyTorch Lightning (``lightning`` or
  ``pytorch_lightning``: Lightning calls callback hooks by name, so the same class serves both), extra ``gradflow-torch[lightning]``.
- ``gradflow.integrations.transformers.GradflowTrainerCallback``: the Hugging Face ``Trainer``,
  extra ``gradflow-torch[transformers]``.
- ``gradflow.integrations.accelerate.record_if_synced``: a custom accelerate loop.

Example:
    >>> from gradflow.integrations.lightning import GradflowCallback      # doctest: +SKIP
    >>> trainer = lightning.Trainer(callbacks=[GradflowCallback()])      # doctest: +SKIP
"""

__all__: list[str] = []
