"""What kind of module owns each parameter: the ``kind`` column of gradients.csv.

Kinds: ``linear`` (``nn.Linear`` and Hugging Face's ``Conv1D``, a linear layer stored
transposed), ``conv`` (``nn.Conv1d/2d/3d`` and transposed), ``norm`` (BatchNorm, LayerNorm,
GroupNorm, InstanceNorm, RMSNorm and any module whose class name contains "norm", such as
``LlamaRMSNorm``), ``embedding`` (``nn.Embedding``, ``nn.EmbeddingBag``), ``embedding+head`` (an
embedding whose weight is also a later module's weight: a tied output head, as in GPT-2 and
nanoGPT; ``named_parameters()`` lists it once), ``recurrent`` (``nn.RNN``, ``nn.LSTM``,
``nn.GRU``), ``attention`` (``nn.MultiheadAttention``'s own ``in_proj_weight``), ``other``
(parameters held directly by any other module, such as a learned position table). Gate rows
(``gates.py``) are ``gate``. Whether a parameter is a bias is in its name.

Example:
    >>> parameter_kinds(nn.Sequential(nn.Conv2d(3, 4, 3), nn.BatchNorm2d(4)))
    {'0.weight': 'conv', '0.bias': 'conv', '1.weight': 'norm', '1.bias': 'norm'}
"""

from __future__ import annotations

from torch import nn

GATE = "gate"
TIED_HEAD = "embedding+head"


def module_kind(module: nn.Module) -> str:
    """The kind of one module (see the module docstring)."""
    cls = type(module).__name__
    if isinstance(module, (nn.Embedding, nn.EmbeddingBag)):
        return "embedding"
    if isinstance(module, nn.RNNBase):
        return "recurrent"
    if isinstance(module, nn.modules.conv._ConvNd):
        return "conv"
    if isinstance(module, nn.Linear) or (cls == "Conv1D" and hasattr(module, "nf")):
        return "linear"
    if isinstance(module, nn.MultiheadAttention):
        return "attention"
    if "norm" in cls.lower():
        return "norm"
    return "other"


PARAMETRIZED = ".parametrizations."   # torch.nn.utils.parametrize's modules: fc.parametrizations.weight


def parametrized_owner(name: str) -> str | None:
    """The module that owns a parametrized weight's tensors, from a name below it (a module's or
    a parameter's): ``fc`` for ``fc.parametrizations.weight`` (and ``...weight.original``), ``""``
    for the model's own (``parametrizations.weight``); None outside any parametrization.

    Example:
        >>> parametrized_owner("fc.parametrizations.weight.original0"), parametrized_owner("parametrizations.weight")
        ('fc', '')
    """
    dotted = "." + name                   # the root's own parametrizations have no owner before them
    return dotted.rpartition(PARAMETRIZED)[0][1:] if PARAMETRIZED in dotted else None


def parameter_kinds(model: nn.Module) -> dict[str, str]:
    """``named_parameters()`` name -> kind of the module that owns it (the first owner for a
    shared parameter; ``embedding+head`` for an embedding weight that a later module reuses)."""
    first = {id(p): n for n, p in model.named_parameters()}
    kinds: dict[str, str] = {}
    modules = dict(model.named_modules())
    for module_name, module in modules.items():
        # A parametrized weight's tensors live in a ParametrizationList under its module
        # (fc.parametrizations.weight): their kind is the module's (fc's).
        owner = parametrized_owner(module_name)
        owner_module = modules.get(owner) if owner is not None else None
        kind = module_kind(owner_module if owner_module is not None else module)
        for pname, p in module.named_parameters(recurse=False):
            full = f"{module_name}.{pname}" if module_name else pname
            owner = first.get(id(p), full)
            if owner != full and kinds.get(owner) == "embedding" and pname == "weight":
                kinds[owner] = TIED_HEAD
            kinds.setdefault(owner, kind)
    return {name: kinds.get(name, "other") for name in first.values()}
