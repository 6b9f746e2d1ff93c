"""Measures: layers by weight (biases and norms aside), gradient relative to weight, the real head
(tied or named), forward order, stacked RNNs per layer, output squashing left out."""

import pytest
from synthetic_windows import history, norm_windows
from torch import nn

from gradflow.analysis.diagnose import diagnose
from gradflow.analysis.measures import analysis_kinds, measure_activations


def test_layer_evidence_uses_weights_and_reads_trend():
    windows = history(sizes=(0.001, 0.01, 0.1))
    for w in windows[10:]:                      # the first layer recovers later in the run
        w.gradients["dense_1.weight"]["mean_abs"] = 0.05
    layers = diagnose(windows).evidence["layers"]
    assert list(layers) == ["dense_1", "dense_2", "dense_3"]
    assert layers["dense_1"]["parameter"] == "dense_1.weight"
    assert layers["dense_1"]["ratio_early"] == pytest.approx(0.01)
    assert layers["dense_1"]["ratio_last"] == pytest.approx(0.5)
    assert layers["dense_1"]["update_ratio"] == pytest.approx(1e-3)        # NaN bias ratios are missing
    assert layers["dense_3"]["ratio_early"] == 1.0


def test_output_squashing_is_not_judged_for_saturation():
    windows = history(saturated=0.1)
    for w in windows:
        w.activations["sigmoid_3"] = {"mean": 0.5, "std": 0.5, "saturated_fraction": 1.0}
    activations = measure_activations(windows)
    assert activations["sigmoid_3"]["output"] and "output" not in activations["tanh_2"]
    assert diagnose(windows).verdicts == ["healthy"]


def test_parameters_without_gradient_in_somenorm_windows():
    windows = history()
    del windows[0].gradients["dense_1.weight"], windows[0].gradients["dense_1.bias"]
    assert diagnose(windows).verdicts == ["healthy"]


def test_layers_compare_gradient_relative_to_weight():
    # per element the conv gradient is 100x smaller, relative to its weight it is not
    windows = norm_windows({"conv.weight": (1.0, 10.0, 0.0), "fc.weight": (0.1, 1.0, 0.0)})
    layers = diagnose(windows, [1.0 - 0.05 * i for i in range(10)]).evidence["layers"]
    assert layers["conv"]["ratio_early"] == pytest.approx(1.0)
    assert layers["fc"]["role"] == "head"


def test_norm_layers_and_biases_are_not_evidence():
    windows = norm_windows({"conv1.weight": (0.1, 1.0, 0.0), "bn1.weight": (1e-6, 1.0, 0.0),
                        "conv2.weight": (0.1, 1.0, 0.0), "conv2.bias": (1e-9, 1.0, 0.0), "fc.weight": (0.1, 1.0, 0.0)})
    diagnosis = diagnose(windows, [1.0 - 0.05 * i for i in range(10)])
    assert diagnosis.verdicts == ["healthy"], diagnosis.report()
    assert diagnosis.evidence["layers"]["bn1"]["role"] == "norm"
    assert diagnosis.evidence["layers"]["conv2"]["ratio_early"] == pytest.approx(1.0)


def test_tied_head_is_the_embedding_and_rows_without_gradient_do_not_count():
    # GPT-2 lists the tied head once, as the embedding; ln_f comes last
    windows = norm_windows({"wte.weight": (0.1, 1.0, 0.0), "h.0.attn.weight": (0.1, 1.0, 0.0),
                        "ln_f.weight": (1e-5, 1.0, 0.0)})
    layers = diagnose(windows).evidence["layers"]
    assert layers["wte"]["role"] == "head" and layers["ln_f"]["role"] == "norm"
    rows = norm_windows({"embed.weight": (0.01, 1.0, 0.99), "fc.weight": (0.1, 1.0, 0.0), "head.weight": (0.1, 1.0, 0.0)})
    embed = diagnose(rows).evidence["layers"]["embed"]
    assert embed["ratio_early"] == pytest.approx(1.0) and embed["role"] == "embedding"


def test_tied_head_from_the_model():
    model = nn.ModuleDict({"emb": nn.Embedding(10, 4), "mix": nn.Linear(4, 4), "norm": nn.LayerNorm(4),
                           "lm_head": nn.Linear(4, 10, bias=False)})
    model["lm_head"].weight = model["emb"].weight
    kinds = analysis_kinds(model)
    assert kinds["@head"] == "emb.weight" and kinds["norm.weight"] == "norm"
    windows = norm_windows({"emb.weight": (0.1, 1.0, 0.0), "mix.weight": (0.1, 1.0, 0.0),
                        "norm.weight": (1e-6, 1.0, 0.0)})
    assert diagnose(windows, model=model).evidence["layers"]["emb"]["role"] == "head"


def test_forward_order_decides_input_and_output():
    windows = norm_windows({"head.weight": (0.1, 1.0, 0.0), "a.weight": (1e-5, 1.0, 0.0), "b.weight": (1e-4, 1.0, 0.0)})
    diagnosis = diagnose(windows, order=["a.weight", "b.weight", "head.weight"])
    assert list(diagnosis.evidence["layers"])[0] == "a" and "vanishing" in diagnosis.verdicts
    assert diagnosis.evidence["order"] == "forward"


def test_stacked_lstm_is_judged_per_layer():
    rows = {"embed.weight": (0.01, 1.0, 0.9)}
    for k, g in enumerate((1e-5, 1e-4, 1e-3, 0.05)):
        rows.update({f"lstm.weight_ih_l{k}": (g, 1.0, 0.0), f"lstm.weight_hh_l{k}": (g, 1.0, 0.0),
                     f"lstm.bias_ih_l{k}": (g, 1.0, 0.0)})
    rows["head.weight"] = (0.1, 1.0, 0.0)
    diagnosis = diagnose(norm_windows(rows), [5.0 - 0.1 * i for i in range(10)])
    assert [n for n in diagnosis.evidence["layers"] if n.startswith("lstm")] == ["lstm.l0", "lstm.l1", "lstm.l2", "lstm.l3"]
    assert diagnosis.verdicts == ["vanishing"]
    assert diagnosis.evidence["family"] == "recurrent" and "clip" in diagnosis.recommendation


class _TinyViT(nn.Module):
    """A top-level cls_token, a patch Linear, one nn.MultiheadAttention (its out_proj never runs
    as a module), a head whose name says nothing."""

    def __init__(self, head: str) -> None:
        super().__init__()
        import torch

        self.cls_token = nn.Parameter(torch.zeros(1, 1, 8))
        self.patch = nn.Linear(4, 8)
        self.attn = nn.MultiheadAttention(8, 2, batch_first=True)
        self.mlp = nn.Linear(8, 8)
        self.head_name = head
        setattr(self, head, nn.Linear(8, 3))

    def forward(self, x):
        import torch

        x = self.patch(x)
        x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1)
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return getattr(self, self.head_name)(torch.relu(self.mlp(x))[:, 0])


@pytest.mark.parametrize("head", ["head", "to_logits"])
def test_a_real_attention_model_places_out_proj_and_finds_its_head_by_the_graph(head, one_thread):
    """Issue 23: with the live monitor's forward order, out_proj (never called as a module) sits
    after its attention, not after the head; cls_token is not the first hidden layer; the head is
    the last parameter owner in forward order, whatever its name."""
    import torch

    from gradflow import GradientMonitor
    from gradflow.analysis.diagnose import diagnose_monitor

    torch.manual_seed(0)
    model = _TinyViT(head)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    x, y = torch.randn(16, 5, 4), torch.randint(0, 3, (16,))
    losses = []
    with GradientMonitor(model, None, histograms=False) as monitor:
        for step in range(6):
            loss = torch.nn.functional.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            monitor.log(step)
            losses.append(loss.item())
        diagnosis = diagnose_monitor(monitor, losses, model=model, optimizer=optimizer)
    layers = diagnosis.evidence["layers"]
    assert list(layers) == ["cls_token", "patch", "attn", "attn.out_proj", "mlp", head], list(layers)
    assert layers[head]["role"] == "head" and layers["cls_token"]["role"] == "embedding"
    assert diagnosis.evidence["optimizer"] == "Adam"


def test_tensorboard_gets_the_size_diagnose_judges(one_thread):
    """grad/<param>/relative is ||g|| / ||w||: the gradient's norm at the step (torch's, read from
    p.grad before the step applies it) over the weight's norm at the window's end."""
    import torch

    from gradflow import GradientMonitor
    from gradflow.monitor.sinks import ScalarSink

    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 4), nn.Tanh(), nn.Linear(4, 2))
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scalars = {}
    with GradientMonitor(model, ScalarSink(lambda values, step: scalars.update(values))) as monitor:
        loss = model(torch.randn(8, 3)).pow(2).mean()
        loss.backward()
        expected_grad = model[0].weight.grad.norm().item()
        optimizer.step()
        monitor.log(0)
    expected = expected_grad / model[0].weight.detach().norm().item()
    assert scalars["grad/0/weight/relative"] == pytest.approx(expected, rel=1e-5)
