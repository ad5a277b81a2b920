"""`reid-eval`: retrieval metrics (CMC, mAP, mINP) and the stream's assign-or-create accuracy
of a checkpoint on a labelled dataset, as a table, JSON and PNG figures.

Checkpoints: a `reid-ensemble/1` file (what `reid-train` writes for the stream ensemble and
what `reid-stream` loads), or a `reid-single/1` file (one backbone); both formats are defined
in `reid.weights`. Data: a training config's held-out split, or a whole dataset
(`reid.training.data.load_split`). For the ensemble, retrieval uses the stream's score
s = 0.6 cos(r) + 0.4 cos(e), i.e. the cosine of the concatenation [sqrt(0.6) r, sqrt(0.4) e],
so re-ranking and the protocol see exactly what the stream compares.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from reid.evaluation import stream_accuracy
from reid.evaluation.metrics import (
    RankResult,
    cosine_distance,
    evaluate_rank,
    re_ranking,
    valid_gallery_mask,
)
from reid.matching import DEFAULT_THRESHOLD, W_EFFNET, W_RESNET
from reid.preprocess import Preprocess
from reid.training.config import Config, DataConfig, ModelConfig, load_config, parse_overrides
from reid.training.data import Sample, Split, data_from_path, load_split, load_uint8
from reid.training.models import EnsembleModel, build_model, input_preprocess
from reid.weights import LoadedEnsemble, load_any_checkpoint, load_ensemble

log = logging.getLogger(__name__)


@dataclass
class EvalModel:
    model: nn.Module  # eval mode; returns {member: [N, dim] normalised}
    preprocess: Preprocess
    embedding_version: str
    kind: str  # "ensemble" | "single"
    meta: dict[str, Any] = field(default_factory=dict)


def load_checkpoint(path: str | Path) -> EvalModel:
    """A `reid-ensemble/1` or `reid-single/1` checkpoint, ready for `embed`."""
    loaded = load_any_checkpoint(Path(path))
    if isinstance(loaded, LoadedEnsemble):
        ens = loaded.model
        model = EnsembleModel(ens.resnet, ens.effnet, loaded.members).eval()
        return EvalModel(
            model, loaded.preprocess, loaded.embedding_version, "ensemble", dict(loaded.meta)
        )
    # A single backbone is one of training's models: rebuilt from its config, then loaded.
    height, width = loaded.preprocess.input_size
    view = DataConfig(input_size=height, input_width=width, fit=loaded.preprocess.fit)
    model = build_model(ModelConfig(**{**loaded.model_config, "pretrained": ""}), view)
    model.load_state_dict(loaded.state_dict)
    return EvalModel(
        model.eval(), loaded.preprocess, loaded.embedding_version, "single", dict(loaded.meta)
    )


def stream_default(input_size: int | None = None) -> EvalModel:
    """What `reid-stream` runs without a checkpoint (ImageNet trunks if cached, else the
    calibrated seeded init): the baseline a trained checkpoint replaces."""
    loaded = load_ensemble(None, input_size=input_size)
    model = EnsembleModel(loaded.model.resnet, loaded.model.effnet).eval()
    return EvalModel(model, loaded.preprocess, loaded.embedding_version, "ensemble")


def model_for_config(cfg: Config) -> EvalModel:
    """The model as training would start it (pretrained file or seeded init): "before"."""
    model = build_model(cfg.model, cfg.data).eval()
    kind = "ensemble" if isinstance(model, EnsembleModel) else "single"
    preprocess = input_preprocess(cfg.model, cfg.data)
    return EvalModel(model, preprocess, f"untrained-{cfg.name}", kind)


@torch.no_grad()
def embed(
    model: nn.Module,
    samples: Sequence[Sample],
    preprocess: Preprocess,
    *,
    batch_size: int = 64,
    flip: bool = False,
    half: bool = False,
    device: str = "cpu",
    images: dict[str, torch.Tensor] | None = None,
) -> dict[str, np.ndarray]:
    """Per member, float32 [N, dim] L2-normalised embeddings of ``samples``.

    ``flip`` averages each image's embedding with its mirror's (flip test). ``half`` runs the
    forward in float16 (autocast on CUDA; on the CPU the model itself is cast, which is slow
    but shows the same rounding)."""
    model = model.eval().to(device)
    if half and device == "cpu":
        model = model.half()
    out: dict[str, list[np.ndarray]] = {}
    bar = tqdm(total=len(samples), desc="embedding", unit="img", disable=not sys.stderr.isatty())
    for start in range(0, len(samples), batch_size):
        chunk = samples[start : start + batch_size]
        pixels = torch.stack(
            [
                images[s.path] if images and s.path in images else load_uint8(s.path, preprocess)
                for s in chunk
            ]
        )
        x = preprocess.normalise(pixels).to(device)
        views = [x, x.flip(3)] if flip else [x]
        acc: dict[str, torch.Tensor] = {}
        for v in views:
            if half and device != "cpu":
                with torch.autocast("cuda", dtype=torch.float16):
                    res = model(v)
            else:
                res = model(v.half() if half else v)
            for name, e in res.items():
                acc[name] = acc.get(name, 0) + e.float()
        for name, e in acc.items():
            out.setdefault(name, []).append(torch.nn.functional.normalize(e, dim=1).cpu().numpy())
        bar.update(len(chunk))
    bar.close()
    if half and device == "cpu":
        model.float()
    return {k: np.concatenate(v) for k, v in out.items()}


def retrieval_feature(emb: dict[str, np.ndarray]) -> np.ndarray:
    """The vector whose cosine is the stream's score (see the module docstring)."""
    if "embedding" in emb:
        return emb["embedding"]
    return np.concatenate(
        [math.sqrt(W_RESNET) * emb["resnet"], math.sqrt(W_EFFNET) * emb["effnet"]], axis=1
    ).astype(np.float32)


def stream_pair(emb: dict[str, np.ndarray]) -> tuple[np.ndarray, np.ndarray]:
    if "embedding" in emb:
        return emb["embedding"], emb["embedding"]
    return emb["resnet"], emb["effnet"]


def retrieval(
    split: Split,
    q_feat: np.ndarray,
    g_feat: np.ndarray,
    *,
    exclude_same_camera: bool = True,
    rerank: bool = False,
) -> tuple[RankResult, np.ndarray]:
    distmat = re_ranking(q_feat, g_feat) if rerank else cosine_distance(q_feat, g_feat)
    q_pids = np.array([_pid(s) for s in split.query])
    g_pids = np.array([_pid(s) for s in split.gallery])
    q_cams = np.array([s.camera for s in split.query])
    g_cams = np.array([s.camera for s in split.gallery])
    index = np.arange(len(split.query)) if split.all_vs_all else None
    result = evaluate_rank(
        distmat,
        q_pids,
        g_pids,
        q_cams,
        g_cams,
        exclude_same_camera=exclude_same_camera,
        q_index=index,
        g_index=index,
    )
    return result, distmat


def _pid(s: Sample) -> object:
    # Junk keeps the metrics' JUNK marker; other identities compare as strings.
    return -1 if s.identity == "-1" else s.identity


def run_eval(
    em: EvalModel,
    split: Split,
    *,
    exclude_same_camera: bool = True,
    rerank: bool = False,
    flip: bool = False,
    fp16_compare: bool = False,
    threshold: float = DEFAULT_THRESHOLD,
    target_false_merge: float = 0.05,
    stream_seed: int | None = None,
    stream_batch: int = 16,
    device: str = "cpu",
    out_dir: Path | None = None,
    plots: bool = True,
    grid_queries: int = 8,
) -> dict[str, Any]:
    """All the metrics of one model on one split; figures into ``out_dir`` when given."""
    t0 = time.perf_counter()
    samples = list(dict.fromkeys([*split.query, *split.gallery]))
    position = {s: i for i, s in enumerate(samples)}
    images = {s.path: load_uint8(s.path, em.preprocess) for s in samples}
    emb = embed(em.model, samples, em.preprocess, flip=flip, device=device, images=images)
    feat = retrieval_feature(emb)
    qi = [position[s] for s in split.query]
    gi = [position[s] for s in split.gallery]
    result: dict[str, Any] = {
        "embedding_version": em.embedding_version,
        "kind": em.kind,
        "input_size": list(em.preprocess.input_size),
        "protocol": {
            "exclude_same_camera": exclude_same_camera,
            "all_vs_all": split.all_vs_all,
            "flip_test": flip,
        },
    }
    rank, distmat = retrieval(split, feat[qi], feat[gi], exclude_same_camera=exclude_same_camera)
    result["retrieval"] = rank.summary()
    if rerank:
        rr, _ = retrieval(
            split, feat[qi], feat[gi], exclude_same_camera=exclude_same_camera, rerank=True
        )
        result["retrieval_reranked"] = rr.summary()
    if fp16_compare:
        emb16 = embed(
            em.model, samples, em.preprocess, flip=flip, device=device, half=True, images=images
        )
        f16 = retrieval_feature(emb16)
        r16, _ = retrieval(split, f16[qi], f16[gi], exclude_same_camera=exclude_same_camera)
        result["fp16"] = {
            **r16.summary(),
            "max_abs_diff": float(np.abs(f16 - feat).max()),
            "min_cosine_to_fp32": float(np.min(np.sum(f16 * feat, 1) / np.sum(feat * feat, 1))),
        }

    # The stream: every test detection once, in capture order (date, camera, path) or shuffled.
    ids = [s.identity for s in samples]
    order = stream_accuracy.replay_order(
        len(samples), [(s.date, s.camera, s.path) for s in samples], seed=stream_seed
    )
    r, e = stream_pair(emb)
    at = stream_accuracy.evaluate_stream(r, e, ids, order, threshold, stream_batch)
    sweep = stream_accuracy.threshold_sweep(r, e, ids, order, batch_size=stream_batch)
    best = stream_accuracy.suggest_threshold(sweep, target_false_merge)
    result["stream"] = {
        **at.to_dict(),
        "order": "capture" if stream_seed is None else f"random(seed={stream_seed})",
        "batch_size": stream_batch,
    }
    result["stream_sweep"] = [x.to_dict() for x in sweep]
    result["suggested_threshold"] = (
        None if best is None else {"target_false_merge_rate": target_false_merge, **best.to_dict()}
    )
    result["seconds"] = round(time.perf_counter() - t0, 1)

    if out_dir is not None:
        out_dir.mkdir(parents=True, exist_ok=True)
        (out_dir / "metrics.json").write_text(json.dumps(result, indent=2))
        if plots:
            _figures(
                out_dir, split, feat, distmat, ids, result, threshold, exclude_same_camera,
                grid_queries,
            )  # fmt: skip
    return result


def _figures(
    out_dir: Path,
    split: Split,
    feat: np.ndarray,
    distmat: np.ndarray,
    ids: list[str],
    result: dict[str, Any],
    threshold: float,
    exclude_same_camera: bool,
    grid_queries: int,
) -> None:
    from reid.evaluation import plots  # matplotlib: the optional `train` extra

    g_pids = np.array([_pid(s) for s in split.gallery], dtype=object)
    g_cams = np.array([s.camera for s in split.gallery])
    rows, queries = [], []
    step = max(1, len(split.query) // grid_queries)
    for q in range(0, len(split.query), step)[:grid_queries]:
        order = np.argsort(distmat[q], kind="stable")
        keep = valid_gallery_mask(
            _pid(split.query[q]),
            split.query[q].camera,
            g_pids[order],
            g_cams[order],
            exclude_same_camera=exclude_same_camera,
            q_index=q if split.all_vs_all else None,
            g_index=order if split.all_vs_all else None,
        )
        rows.append(order[keep][:5].tolist())
        queries.append(split.query[q])
    plots.ranked_grid(queries, split.gallery, rows, out_dir / "ranked.png")
    plots.embedding_map(feat, ids, out_dir / "embedding_map.png")
    sug = result["suggested_threshold"]
    plots.threshold_sweep(
        result["stream_sweep"],
        out_dir / "threshold_sweep.png",
        None if sug is None else sug["threshold"],
        threshold,
    )


def format_table(result: dict[str, Any]) -> str:
    lines = [
        f"model {result['embedding_version']} ({result['kind']}, input {result['input_size']})"
    ]
    for key in ("retrieval", "retrieval_reranked", "fp16"):
        if key in result:
            r = result[key]
            lines.append(
                f"  {key:<19} rank1 {r['rank1']:.3f}  rank5 {r['rank5']:.3f}  rank10 "
                f"{r['rank10']:.3f}  mAP {r['mAP']:.3f}  mINP {r['mINP']:.3f}  "
                f"({r['queries']} queries, {r['queries_without_match']} without a valid match)"
            )
    s = result["stream"]
    lines.append(
        f"  stream @ {s['threshold']:.2f} ({s['order']}): accuracy {s['accuracy']:.3f}  "
        f"5+ sightings {s['accuracy_5plus']:.3f}  deer {s['deer']} for {s['individuals']} "
        f"individuals  false merges {s['false_merges']} ({s['false_merge_rate']:.3f})  "
        f"fragmentation {s['fragmentation']:.2f}"
    )
    sug = result["suggested_threshold"]
    if sug is None:
        lines.append("  suggested threshold: none meets the false-merge target")
    else:
        lines.append(
            f"  suggested threshold {sug['threshold']:.2f} (false-merge rate <= "
            f"{sug['target_false_merge_rate']}): accuracy {sug['accuracy']:.3f}, "
            f"false-merge rate {sug['false_merge_rate']:.3f}, "
            f"fragmentation {sug['fragmentation']:.2f}; in the stream: reid-stream activate "
            f"{result['embedding_version']} --threshold {sug['threshold']:.2f}"
        )
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="reid-eval", description=__doc__.split("\n\n")[0])
    p.add_argument("--checkpoint", type=Path, help="reid-ensemble/1 or reid-single/1 file")
    p.add_argument("--config", type=Path, help="training config: its data and held-out split")
    p.add_argument(
        "--data",
        type=Path,
        help="a dataset (Market-1501 folder, CSV, folders) "
        "evaluated whole, instead of a config's held-out split",
    )
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override a config key, e.g. --set model.pretrained=FILE",
    )
    p.add_argument(
        "--untrained",
        action="store_true",
        help="evaluate the config's model as training starts it (the 'before')",
    )
    p.add_argument(
        "--stream-default",
        action="store_true",
        help="evaluate the stream's ensemble without a checkpoint (the baseline)",
    )
    p.add_argument("--input-size", type=int, help="with --stream-default")
    p.add_argument("--camera-field", default="auto", help="CSV: auto|camera|encounter|none")
    p.add_argument(
        "--exclude-same-camera",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the Market-1501 exclusion (default: the config's, else on); "
        "--no-exclude-same-camera keeps same-camera matches (optimistic)",
    )
    p.add_argument("--rerank", action="store_true", help="also report k-reciprocal re-ranking")
    p.add_argument("--flip-test", action="store_true")
    p.add_argument("--fp16", action="store_true", help="also compare fp16 with fp32")
    p.add_argument("--threshold", type=float, default=DEFAULT_THRESHOLD)
    p.add_argument("--target-false-merge", type=float, default=0.05)
    p.add_argument("--stream-order", default="capture", help="capture | random:SEED")
    p.add_argument("--stream-batch", type=int, default=16)
    p.add_argument("--device", default="cpu")
    p.add_argument("--out", type=Path, help="folder for metrics.json and the PNG figures")
    p.add_argument("--no-plots", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    try:
        cfg = load_config(args.config, parse_overrides(args.set)) if args.config else None
        if args.stream_default:
            em = stream_default(args.input_size)
        elif args.untrained:
            if cfg is None:
                p.error("--untrained needs --config")
            em = model_for_config(cfg)
        elif args.checkpoint:
            em = load_checkpoint(args.checkpoint)
        else:
            p.error("give --checkpoint, or --config with --untrained")
        if args.data is not None:
            split = load_split(data_from_path(args.data, args.camera_field), use_split=False)
        elif cfg is not None:
            split = load_split(cfg.data)
        else:
            p.error("give --data or --config")
    except (ValueError, OSError) as exc:
        print(f"reid-eval: {exc}", file=sys.stderr)
        return 2
    exclude = args.exclude_same_camera
    if exclude is None:
        exclude = cfg.data.exclude_same_camera if cfg is not None and args.data is None else True
    seed = None if args.stream_order == "capture" else int(args.stream_order.split(":")[1])
    result = run_eval(
        em,
        split,
        exclude_same_camera=exclude,
        rerank=args.rerank,
        flip=args.flip_test,
        fp16_compare=args.fp16,
        threshold=args.threshold,
        target_false_merge=args.target_false_merge,
        stream_seed=seed,
        stream_batch=args.stream_batch,
        device=args.device,
        out_dir=args.out,
        plots=not args.no_plots,
    )
    print(format_table(result))
    if args.out:
        print(f"wrote {args.out / 'metrics.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
