"""What a teacher logit cache holds: manifest, storage cost, and the teacher's confidence over all tokens.

`inspect_cache(path)` returns the numbers; `format_report` renders them for `slimmoe logits inspect`.
Definitions (per token position):
  top1_prob     exp(log-prob of the most likely token), over the full vocabulary
  topk_entropy  entropy in nats of the top-k probabilities renormalised to sum to 1 WITHIN the top-k
                (so it ignores the tail; the tail is reported separately)
  tail_mass     exp(rest_logprob): probability mass outside the top-k
  mass_error    |sum(exp(top-k log-probs)) + tail_mass - 1|: float16 storage error, should be ~1e-3

Damage is not a statistic: a file that fails its checksums or holds NaN / inf log-probs raises
(LogitCacheError, naming the file). Disagreeing teacher fingerprints (a split's manifest against
its files' footers, its node output's manifest, the other splits, or the teacher directory the
manifest records, when that is still there) are reported as `warnings` and WARNING lines, because
inspecting is how one finds out which of them is wrong.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from slimmoe.tasks.core.fingerprint import model_fingerprint
from slimmoe.tasks.data.readers import LogitCache, open_logit_cache
from slimmoe.tasks.data.formats import MANIFEST, LogitCacheError, read_manifest

ENTROPY_NOTE = "entropy (nats) of the top-k probabilities renormalised within the top-k"


def _stats(values: np.ndarray) -> dict[str, float]:
    v = values.astype(np.float64)
    p5, p50, p95 = np.percentile(v, [5, 50, 95])
    return {"mean": float(v.mean()), "p5": float(p5), "p50": float(p50), "p95": float(p95),
            "min": float(v.min()), "max": float(v.max())}


def _load_tokenizer(tokenizer_dir):
    if tokenizer_dir is None or not Path(tokenizer_dir).is_dir():
        return None
    from slimmoe.tasks.data.calibration import load_tokenizer

    try:
        return load_tokenizer(tokenizer_dir)
    except ValueError:
        return None


def _token_stats(cache: LogitCache, rows: np.ndarray) -> dict[str, np.ndarray]:
    top1, entropy, tail, mass_err = [], [], [], []
    # One file's worth of rows at a time keeps memory at a few decoded files.
    bounds = np.searchsorted(rows, cache._starts[1:-1])
    for chunk in np.split(rows, bounds):
        if not len(chunk):
            continue
        a = cache.read_numpy(chunk)
        lp = a["topk_logprobs"].astype(np.float32)
        p = np.exp(lp)
        top1.append(p.max(-1).reshape(-1))
        q = p / p.sum(-1, keepdims=True)
        with np.errstate(divide="ignore", invalid="ignore"):
            entropy.append(-(np.where(q > 0, q * np.log(q), 0.0)).sum(-1).reshape(-1))
        t = np.exp(a["rest_logprob"].astype(np.float64))
        tail.append(t.reshape(-1))
        mass_err.append(np.abs(p.sum(-1, dtype=np.float64) + t - 1.0).reshape(-1))
    return {k: np.concatenate(v) for k, v in
            (("top1_prob", top1), ("topk_entropy", entropy), ("tail_mass", tail), ("mass_error", mass_err))}


def _decode(tok, ids) -> str:
    return tok.decode([int(i) for i in ids], clean_up_tokenization_spaces=False) if tok is not None else " ".join(map(str, ids))


def _samples(cache: LogitCache, n: int, tok, alternatives: int = 4, context: int = 12, seed: int = 0) -> list[dict]:
    if n <= 0:
        return []
    rng = np.random.default_rng(seed)
    T = cache.seq_len
    rows = rng.integers(0, cache.num_rows, size=n)
    positions = rng.integers(0, max(1, T - 1), size=n)
    a = cache.read_numpy(rows)
    out = []
    for i, (r, t) in enumerate(zip(rows, positions)):
        ids = a["input_ids"][i]
        ctx_ids = ids[max(0, t + 1 - context) : t + 1]
        ctx = ("…" if t + 1 > context else "") + _decode(tok, ctx_ids)
        preds = [{"id": int(tid), "token": _decode(tok, [tid]), "p": float(np.exp(np.float32(lp)))}
                 for tid, lp in zip(a["topk_ids"][i, t][: alternatives + 1], a["topk_logprobs"][i, t][: alternatives + 1])]
        nxt = None
        if t + 1 < T:
            nid = int(ids[t + 1])
            hit = np.nonzero(a["topk_ids"][i, t] == nid)[0]
            nxt = {"id": nid, "token": _decode(tok, [nid]),
                   "p": float(np.exp(np.float32(a["topk_logprobs"][i, t][hit[0]]))) if len(hit) else None}
        line = f"{ctx!r} → " + " | ".join(f"{p['token']!r} (p={p['p']:.3f})" for p in preds)
        if nxt is not None:
            line += f"   [actual next: {nxt['token']!r}, " + (f"p={nxt['p']:.3f}]" if nxt["p"] is not None else "outside the top-k]")
        out.append({"row": int(r), "position": int(t), "context": ctx, "predictions": preds, "next": nxt, "text": line})
    return out


def _teacher_dir_check(manifest: dict, where: str, seen: dict[str, str | None]) -> tuple[list[str], str]:
    """(warnings, what was checked) comparing the manifest's teacher fingerprint with the teacher
    directory it records. `seen` memoises fingerprints by directory (one teacher, several manifests)."""
    teacher_dir, said = manifest.get("teacher_dir"), manifest.get("teacher_fingerprint")
    if not teacher_dir:
        return [], "not checked: the manifest records no teacher directory"
    if teacher_dir not in seen:
        try:
            seen[teacher_dir] = model_fingerprint(teacher_dir) if Path(teacher_dir).is_dir() else None
        except (FileNotFoundError, OSError, ValueError):
            seen[teacher_dir] = None
    actual = seen[teacher_dir]
    if actual is None:
        return [], f"not checked: the recorded teacher directory {teacher_dir} is not there (or holds no model)"
    if actual == said:
        return [], f"matches {teacher_dir}"
    warning = (f"{where} says teacher fingerprint {said}, but the teacher directory it records, {teacher_dir}, has "
               f"fingerprint {actual}: the teacher changed since the cache was built, or the manifest was edited")
    return [warning], f"differs from {teacher_dir} ({actual})"


def inspect_split(path: str | Path, samples: int = 5, tokenizer_dir: str | Path | None = None,
                  max_rows: int | None = None, seed: int = 0, teacher_fps: dict | None = None) -> dict[str, Any]:
    cache = open_logit_cache(path, strict=False)
    m = cache.manifest
    warnings = list(cache.problems)
    found, teacher_check = _teacher_dir_check(m, str(Path(path) / MANIFEST), {} if teacher_fps is None else teacher_fps)
    warnings += found
    tok_dir = tokenizer_dir if tokenizer_dir is not None else m.get("tokenizer_path")
    tok = _load_tokenizer(tok_dir)
    if tokenizer_dir is not None and tok is None:
        raise ValueError(f"no tokenizer could be loaded from {tokenizer_dir}")
    rows = np.arange(cache.num_rows, dtype=np.int64)
    sampled = max_rows is not None and cache.num_rows > max_rows
    if sampled:
        rows = np.sort(np.random.default_rng(seed).choice(cache.num_rows, size=max_rows, replace=False))
    stats = _token_stats(cache, rows)
    disk = cache.disk_bytes()
    tokens = cache.num_rows * cache.seq_len
    full = cache.full_logits_bytes_per_token()
    manifest = {k: v for k, v in m.items() if k != "files"}
    manifest["num_files"] = len(m["files"])
    with_checksum = sum(1 for f in m["files"] if f.get("checksum"))
    return {
        "path": str(path), "manifest": manifest, "warnings": warnings, "teacher_check": teacher_check,
        "checksums": f"{with_checksum} of {len(m['files'])} files carry one, each checked as it was read"
                     if with_checksum else "none in the manifest (written before checksums were recorded)",
        "rows": cache.num_rows, "tokens": tokens,
        "tokens_inspected": int(len(rows) * cache.seq_len), "sampled_rows": bool(sampled),
        "disk_bytes": disk, "bytes_per_token": disk / max(1, tokens), "full_fp16_bytes_per_token": full,
        "storage_ratio": disk / max(1, tokens) / full,
        "top1_prob": _stats(stats["top1_prob"]), "topk_entropy": _stats(stats["topk_entropy"]),
        "topk_entropy_note": ENTROPY_NOTE, "tail_mass": _stats(stats["tail_mass"]),
        "mass_error": _stats(stats["mass_error"]),
        "tokenizer": str(tok_dir) if tok is not None else None,
        "samples": _samples(cache, samples, tok, seed=seed),
    }


def inspect_cache(path: str | Path, samples: int = 5, tokenizer_dir: str | Path | None = None,
                  max_rows: int | None = None) -> dict[str, Any]:
    """Numbers for one logit-cache split, or for every split of a teacher_logits node output."""
    path = Path(path)
    if path.is_dir() and not (path / MANIFEST).exists() and (path / "config.json").is_file():
        # Without this, read_manifest calls the directory an unfinished cache and advises rebuilding it.
        raise LogitCacheError(f"{path} is a model directory, not a logit cache; inspect the teacher_logits "
                              "output (`slimmoe status CONFIG` shows its path) or one of its splits")
    manifest = read_manifest(path)
    teacher_fps: dict[str, str | None] = {}
    if manifest.get("kind") == "teacher_logits":
        splits = {name: inspect_split(path / name, samples, tokenizer_dir, max_rows, teacher_fps=teacher_fps)
                  for name in manifest["splits"]}
        warnings, teacher_check = _teacher_dir_check(manifest, str(path / MANIFEST), teacher_fps)
        by_split = {name: s["manifest"].get("teacher_fingerprint") for name, s in splits.items()}
        if len(set(by_split.values())) > 1:
            warnings.append("the splits disagree on the teacher fingerprint: "
                            + ", ".join(f"{name} {fp}" for name, fp in by_split.items()))
        warnings += [f"[{name}] {w}" for name, s in splits.items() for w in s["warnings"]]
        return {"kind": "teacher_logits", "path": str(path), "manifest": manifest, "warnings": warnings,
                "teacher_check": teacher_check, "splits": splits}
    split = inspect_split(path, samples, tokenizer_dir, max_rows, teacher_fps=teacher_fps)
    return {"kind": "logit_cache", "path": str(path), "warnings": list(split["warnings"]),
            "splits": {manifest.get("split") or path.name: split}}


def _fmt_stats(s: dict) -> str:
    return f"mean {s['mean']:.4f}  p5 {s['p5']:.4f}  p50 {s['p50']:.4f}  p95 {s['p95']:.4f}"


def format_report(report: dict) -> str:
    lines = [f"{report['kind']}: {report['path']}"]
    warnings = report.get("warnings") or []
    # First, so that a contradicted teacher is not read past on the way to the statistics.
    lines += [f"WARNING: {w}" for w in warnings]
    if report["kind"] == "teacher_logits":
        m = report["manifest"]
        lines.append(f"  teacher {m['teacher_fingerprint']}  tokenizer {m['tokenizer_fingerprint']}  k={m['k']}  "
                     f"vocab={m.get('vocab_size')}  splits: {', '.join(m['splits'])}")
        lines.append(f"  teacher fingerprint {report['teacher_check']}")
    for name, s in report["splits"].items():
        m = s["manifest"]
        lines += [
            f"\n[{name}] {s['path']}",
            f"  teacher {m.get('teacher_fingerprint')}  tokenizer {m.get('tokenizer_fingerprint')}  k={m['k']}  "
            f"seq_len={m['seq_len']}  vocab={m['vocab_size']}",
            f"  teacher fingerprint {s['teacher_check']}; checksums: {s['checksums']}",
            f"  rows {s['rows']}  tokens {s['tokens']}  files {m['num_files']}  dtypes {m.get('dtypes')}  compression {m.get('compression')}",
            f"  disk {s['disk_bytes'] / 2**20:.2f} MiB = {s['bytes_per_token']:.1f} bytes/token; full float16 logits "
            f"{s['full_fp16_bytes_per_token']} bytes/token; ratio {100 * s['storage_ratio']:.3f}%",
            f"  over {s['tokens_inspected']} tokens{' (sampled rows)' if s['sampled_rows'] else ''}:",
            f"    top-1 probability   {_fmt_stats(s['top1_prob'])}",
            f"    top-k entropy       {_fmt_stats(s['topk_entropy'])}   ({s['topk_entropy_note']})",
            f"    tail mass           {_fmt_stats(s['tail_mass'])}",
            f"    |mass sum - 1|      mean {s['mass_error']['mean']:.2e}  max {s['mass_error']['max']:.2e}",
        ]
        if s["samples"]:
            lines.append(f"  samples{' (no tokenizer: token ids)' if s['tokenizer'] is None else ''}:")
            lines += [f"    row {x['row']} pos {x['position']}: {x['text']}" for x in s["samples"]]
    if warnings:
        lines.append(f"\nWARNING: {len(warnings)} disagreement(s), listed at the top, about what made this cache; the "
                     "readers refuse it. Rebuild it: rerun the teacher_logits node (`slimmoe rerun CONFIG teacher_logits`)")
    return "\n".join(lines)
