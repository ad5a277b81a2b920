import copy

import pytest
import torch
from torch import nn

from reid.backbones import EfficientNetB0Embedder, Ensemble, MultiScaleResNet50


@pytest.fixture(scope="module")
def ensemble() -> Ensemble:
    torch.manual_seed(0)
    return Ensemble(MultiScaleResNet50(), EfficientNetB0Embedder()).eval()


@pytest.fixture(scope="module")
def images() -> torch.Tensor:
    return torch.randn(3, 3, 96, 96, generator=torch.Generator().manual_seed(1))


def _unit_rows(x: torch.Tensor) -> bool:
    return torch.allclose(x.norm(dim=1), torch.ones(len(x)), atol=1e-5)


def test_ensemble_outputs_two_unit_512d_embeddings(
    ensemble: Ensemble, images: torch.Tensor
) -> None:
    with torch.inference_mode():
        resnet, effnet = ensemble(images)
    assert resnet.shape == (3, 512)
    assert effnet.shape == (3, 512)
    assert _unit_rows(resnet)
    assert _unit_rows(effnet)
    assert ensemble.resnet.dim == 512
    assert ensemble.effnet.dim == 512
    # Different images give different embeddings (the heads are not constant). The randomly
    # initialised EfficientNet is not checked here: in eval mode, with untrained BatchNorm
    # statistics, its features shrink to ~1e-14 and its output is just the projection bias.
    assert not torch.allclose(resnet[0], resnet[1])


def test_effnet_trunk_feeds_the_projection(ensemble: Ensemble, images: torch.Tensor) -> None:
    # Batch statistics (train mode) keep the untrained trunk's signal alive.
    m = copy.deepcopy(ensemble.effnet).train()
    with torch.no_grad():
        out = m(images)
    assert out.shape == (3, 512)
    assert _unit_rows(out)
    assert not torch.allclose(out[0], out[1], atol=1e-3)


def test_multiscale_heads_read_layer2_layer3_layer4_and_pool(ensemble: Ensemble) -> None:
    m = ensemble.resnet
    assert isinstance(m.trunk.fc, nn.Identity)
    assert m.proj_l2.in_features == 8192
    assert m.proj_l3.in_features == 4096
    assert m.proj_l4.in_features == 2048
    assert m.proj_pool.in_features == 2048
    assert all(p.out_features == 128 for p in (m.proj_l2, m.proj_l3, m.proj_l4, m.proj_pool))
    assert isinstance(ensemble.effnet.trunk.classifier, nn.Identity)
    assert ensemble.effnet.proj.in_features == 1280


@pytest.mark.parametrize("head", ["proj_l2", "proj_l3", "proj_l4", "proj_pool"])
def test_every_resnet_head_contributes(ensemble: Ensemble, images: torch.Tensor, head: str) -> None:
    m = ensemble.resnet
    layer: nn.Linear = getattr(m, head)
    with torch.inference_mode():
        before = m(images)
    saved = layer.weight.detach().clone()
    try:
        with torch.no_grad():
            layer.weight.mul_(3.0).add_(0.01)
        with torch.inference_mode():
            after = m(images)
    finally:
        with torch.no_grad():
            layer.weight.copy_(saved)
    assert not torch.allclose(before, after, atol=1e-4)
    # Each head owns its own 128-d slice: only its slice changes direction.
    index = ["proj_l2", "proj_l3", "proj_l4", "proj_pool"].index(head)
    own = slice(128 * index, 128 * (index + 1))
    b, a = before[:, own], after[:, own]
    cos = (b * a).sum(1) / (b.norm(dim=1) * a.norm(dim=1))
    assert (cos < 0.9999).any()


def test_layer2_feeds_the_embedding(ensemble: Ensemble, images: torch.Tensor) -> None:
    seen: list[tuple[int, ...]] = []
    hook = ensemble.resnet.trunk.layer2.register_forward_hook(
        lambda _m, _i, out: seen.append(tuple(out.shape))
    )
    try:
        with torch.inference_mode():
            ensemble.resnet(images)
    finally:
        hook.remove()
    assert seen == [(3, 512, 12, 12)]


def test_effnet_projection_drives_output(ensemble: Ensemble, images: torch.Tensor) -> None:
    m = ensemble.effnet
    with torch.inference_mode():
        before = m(images)
    saved = m.proj.bias.detach().clone()
    try:
        with torch.no_grad():
            m.proj.bias.add_(torch.linspace(-1, 1, 512))
        with torch.inference_mode():
            after = m(images)
    finally:
        with torch.no_grad():
            m.proj.bias.copy_(saved)
    assert not torch.allclose(before, after, atol=1e-4)
