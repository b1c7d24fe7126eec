"""Anomaly detectors: jaxrisk vs a PyTorch reference that follows cupbearer's own code, same model, same data.

The case is cupbearer's performance test: an MLP [128, 128] (`--hidden`: wider, where the covariance
algebra starts to cost) trained 3 epochs (batch 64) on MNIST with 5%
of the training images given a white top-left pixel and relabelled 0 (trained here by jaxrisk's zoo, then
loaded into a PyTorch `nn.Sequential` with the same weights). Trusted: 30,000 clean training images;
untrusted: the other 30,000, half triggered (cupbearer's QUE setting); test: the 10,000 MNIST test images,
half triggered. Layers: the three linear layers' outputs.

Reference (PyTorch: 2 threads on the CPU, or the GPU where JAX has one): forward hooks on the linear
layers, cupbearer's streaming covariance
(`update_covariance`, batch 4096), its Mahalanobis (pinv, rcond 1e-5, no shrinkage) and its QUE (PCA
whitening by the trusted covariance, exp(alpha C_untrusted / ||C_untrusted||), alpha 4), scored layer by
layer. cupbearer itself does not install here (its release pins torch 2.0 and flax 0.7). jaxrisk: the
same activations from `classifier_activations`, `anomaly.run` (Ledoit-Wolf shrinkage, layer scores
standardised on held-out trusted rows, a threshold). Each side is timed from images to scores (activation
extraction, fit, scoring), best of `--repeats` (jaxrisk's first run, with compilation, reported apart).

    python benchmarks/anomaly_vs_reference.py --out runs/bench_anomaly.json
    python benchmarks/anomaly_vs_reference.py --hidden 1024,1024 --out runs/bench_anomaly_wide.json
"""

from __future__ import annotations

import argparse
import platform
import time
from pathlib import Path

import jax
import numpy as np
import torch

from jaxrisk.anomaly.config import DetectConfig
from jaxrisk.anomaly.data import classifier_task
from jaxrisk.anomaly.run import run
from jaxrisk.data import load_mnist
from jaxrisk.evals.metrics import auroc
from jaxrisk.io import write_json
from jaxrisk.models.classifiers import pure_apply
from jaxrisk.models.weights import torch_state_dict
from jaxrisk.zoo.train import TrainConfig, evaluate, train_classifier
from jaxrisk.zoo.triggers import make_trigger

ROOT = Path(__file__).resolve().parents[1]
MNIST = ROOT.parent / "shared" / "assets" / "data" / "mnist"
LAYERS = ("fc1", "fc2", "fc3")


def torch_mlp(model, hidden: tuple[int, int], device: str) -> torch.nn.Sequential:
    state = torch_state_dict(model)
    net = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(784, hidden[0]), torch.nn.ReLU(),
                              torch.nn.Linear(hidden[0], hidden[1]), torch.nn.ReLU(), torch.nn.Linear(hidden[1], 10))
    for i, name in zip((1, 3, 5), LAYERS):
        net[i].weight.data = torch.from_numpy(np.array(state[f"{name}.weight"]))
        net[i].bias.data = torch.from_numpy(np.array(state[f"{name}.bias"]))
    return net.eval().to(device)


def torch_activations(net, images: np.ndarray, batch: int = 4096) -> dict[str, list[torch.Tensor]]:
    """Per layer, the list of batch outputs (cupbearer streams batches into its statistics)."""
    out = {name: [] for name in LAYERS}
    hooks = [net[i].register_forward_hook(lambda m, a, o, name=name: out[name].append(o.detach()))
             for i, name in zip((1, 3, 5), LAYERS)]
    with torch.no_grad():
        for i in range(0, len(images), batch):
            net(torch.from_numpy(images[i:i + batch]).to(net[1].weight.device))
    for h in hooks:
        h.remove()
    return out


def update_covariance(curr_mean, curr_c, curr_n, new_data):
    """cupbearer.detectors.statistical.helpers.update_covariance."""
    new_n = len(new_data)
    total_n = curr_n + new_n
    new_mean = new_data.mean(dim=0)
    delta_mean = new_mean - curr_mean
    updated_mean = (curr_n * curr_mean + new_n * new_mean) / total_n
    delta_data = new_data - new_mean
    new_c = torch.einsum("bi,bj->ij", delta_data, delta_data)
    updated_c = curr_c + new_c + curr_n * new_n / total_n * torch.einsum("i,j->ij", delta_mean, delta_mean)
    return updated_mean, updated_c, total_n


def mean_cov(batches: list[torch.Tensor]):
    d, device = batches[0].shape[1], batches[0].device
    mean, c, n = torch.zeros(d, device=device), torch.zeros(d, d, device=device), 0
    for b in batches:
        mean, c, n = update_covariance(mean, c, n, b)
    return mean, c / (n - 1)


def reference(net, trusted, untrusted, test, detector: str) -> dict[str, np.ndarray]:
    """cupbearer's Mahalanobis or QUE, layer by layer: {layer: test scores}."""
    t_acts, test_acts = torch_activations(net, trusted), torch_activations(net, test)
    u_acts = torch_activations(net, untrusted) if detector == "que" else None
    scores = {}
    for name in LAYERS:
        mean, cov = mean_cov(t_acts[name])
        x = torch.cat(test_acts[name])
        if detector == "mahalanobis":
            inv = torch.linalg.pinv(cov.double(), rcond=1e-5, hermitian=True).float()
            delta = x - mean
            scores[name] = (torch.einsum("bi,ij,bj->b", delta, inv, delta) / mean.shape[0]).cpu().numpy()
        else:
            eigs = torch.linalg.eigh(cov)
            rsqrt = eigs.eigenvalues.rsqrt()
            rsqrt[eigs.eigenvalues < 1e-5 * eigs.eigenvalues.max()] = 0
            whiten = eigs.eigenvectors * rsqrt.unsqueeze(0)
            _, u_cov = mean_cov(u_acts[name])
            norm = torch.linalg.eigvalsh(u_cov).max()
            z = (x - mean) @ whiten
            q = torch.matrix_exp(4.0 * u_cov / norm)
            scores[name] = torch.einsum("bi,ij,jb->b", z, q, z.mT).cpu().numpy()
    return scores


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="runs/bench_anomaly.json")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--hidden", default="128,128", help="the MLP's two hidden widths (cupbearer's: 128,128)")
    ap.add_argument("--torch-device", default="cuda" if torch.cuda.is_available() else "cpu",
                    help="where the reference runs (default: the GPU when there is one, as jaxrisk's JAX does)")
    args = ap.parse_args()
    torch.set_num_threads(2)
    train, test = load_mnist(MNIST, "train"), load_mnist(MNIST, "test")
    trigger = make_trigger("patch", (1, 28, 28), size=1, location=(0, 0), target=0)
    hidden = tuple(int(w) for w in args.hidden.split(","))
    model = train_classifier(train, TrainConfig(arch="mlp", hidden=hidden, epochs=3, batch_size=64,
                                                poison_rate=0.05), trigger, progress=False)
    trained = evaluate(model, test, trigger)
    rng = np.random.default_rng(0)
    perm = rng.permutation(len(train.images))
    trusted = train.images[perm[:30000]]
    untrusted = train.images[perm[30000:]].copy()
    mixed = rng.random(len(untrusted)) < 0.5
    untrusted[mixed] = trigger.apply(untrusted[mixed])
    inputs = test.images.copy()
    labels = rng.random(len(inputs)) < 0.5
    inputs[labels] = trigger.apply(inputs[labels])
    net = torch_mlp(model, hidden, args.torch_device)
    graphdef, params = pure_apply(model)
    results = {"machine": f"{platform.processor() or platform.machine()}, jax {jax.devices()[0].device_kind}, "
                          f"torch {args.torch_device}", "hidden": hidden, "model": trained,
               "detectors": {}}
    for detector in ("mahalanobis", "que"):
        times = {"reference": [], "jaxrisk": []}
        for _ in range(args.repeats):
            t0 = time.perf_counter()
            ref = reference(net, trusted, untrusted, inputs, detector)
            times["reference"].append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            acts = classifier_task(graphdef, params, trusted, inputs, layers=LAYERS, labels=labels,
                                   untrusted=untrusted if detector == "que" else None)
            ours = run(acts, DetectConfig(detector=detector))
            times["jaxrisk"].append(time.perf_counter() - t0)
        entry = {"reference_auroc": {k: auroc(v, labels) for k, v in ref.items()},
                 "jaxrisk_auroc": {k: ours.metrics["layers"][k]["auroc"] for k in LAYERS},
                 "jaxrisk_aggregate_auroc": ours.metrics["aggregate"]["auroc"],
                 "seconds_reference": min(times["reference"]), "seconds_jaxrisk": min(times["jaxrisk"]),
                 "seconds_jaxrisk_first": times["jaxrisk"][0]}
        entry["speedup"] = entry["seconds_reference"] / entry["seconds_jaxrisk"]
        results["detectors"][detector] = entry
        print(detector, entry, flush=True)
    write_json(args.out, results)


if __name__ == "__main__":
    main()
