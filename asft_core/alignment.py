"""The alignment direction V = W_aligned - W_base, streamed from safetensors checkpoints.

For every 2-D weight of the LoRA target modules (``q_proj``, ``v_proj`` by default), V is
computed one tensor at a time: read the base tensor, read the aligned one, subtract, record
statistics, append V to the artifact, free. Peak memory stays near the size of the largest
target tensor pair, never the model size (the reference implementation holds three full fp32
models, about 116 GB at 7B). Tensors are read with plain file reads, not mmap, so pages
already used do not accumulate in the process's resident set.

The artifact is a safetensors file whose ``__metadata__`` records the module names, shapes,
dtype, both model ids and fingerprints, and per module ||V||_F and the top eigenvalue of
C = V V^T / ||V||_F, which is sigma_1^2 / ||V||_F. When that eigenvalue is tiny in every
module, C is nearly zero and the AsFT penalty ||(I - C) B A||^2 is plain L2 on the update;
the metadata flags this as ``degenerate`` so a user can see it before training, and
:func:`regime` says in words which of L2, projector-like or inverted the penalty is.

The metadata also holds sigma_1, the stable rank ||V||_F^2 / sigma_1^2 and the number k of
singular directions holding half of ||V||_F^2. :func:`alignment_subspaces` gives those top-k
left singular vectors U_k themselves (for the projector penalties), computed once by exact SVD
and cached in a sidecar file beside the artifact.

Beside each V the artifact stores its top ``SPECTRUM_RANK`` left singular vectors and singular
values (``<module>/basis``, ``<module>/sigma``), computed once as V is written: by exact SVD up
to EXACT_SPECTRUM_MAX_DIM, by a randomized one beyond. A low-rank penalty
(:func:`alignment_low_rank`) reads those and never the full V, nor runs an SVD at each start.
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import tempfile
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import torch

from asft_core.penalty import LowRankDirection, energy_rank
from asft_core.spec import DEFAULT_SUBSPACE_ENERGY

# 2 added each module's stored spectrum; artifacts of format 1 still load (without it), but
# the cache key changes, so a cache recomputes its directions once, spectrum included.
FORMAT_VERSION = 2
_READABLE_FORMATS = ("1", "2")
DEFAULT_TARGET_MODULES = ("q_proj", "v_proj")
# Top eigenvalue of C below which C shrinks no direction by more than 1%: the penalty is then
# within about 2% of plain L2 on the update.
DEGENERATE_EIGENVALUE = 1e-2
# The artifact's stats hold the exact spectrum (hence k) up to this min(d_out, d_in): an SVD of
# that size takes about 2 s on one CPU core; larger modules get sigma_1 by power iteration and
# k from :func:`alignment_subspaces` instead.
EXACT_SPECTRUM_MAX_DIM = 2048
# Singular directions stored per module beside V: a penalty_rank up to this never reads V.
# At 4096 x 4096 that is 4 MiB per module next to V's 64 MiB.
SPECTRUM_RANK = 256
# Randomized SVD: extra sampled directions and power iterations (Halko et al.'s defaults are 10
# and 2; more iterations because alignment spectra decay slowly).
_RANDOMIZED_OVERSAMPLE = 16
_RANDOMIZED_ITERATIONS = 6
# A direction u_i of C is penalised (1 - lambda_i)^2 times as much as an orthogonal one.
# Below 0.5 every direction keeps at least 25% of its L2 weight: AsFT reweights, frees nothing.
L2_LIKE_EIGENVALUE = 0.5
# From 0.5 to 1.5, (1 - lambda)^2 <= 25%: the top directions of V are nearly free, as intended.
NEAR_PROJECTOR_EIGENVALUE = 1.5
# Above 2, (1 - lambda)^2 > 1: directions inside V cost more than orthogonal ones.
INVERTED_EIGENVALUE = 2.0

_DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
}
_DTYPE_NAMES = {value: key for key, value in _DTYPES.items()}
_TORCH_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


class AlignmentError(ValueError):
    """The two checkpoints cannot give an alignment direction; ``code`` says why."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


@dataclass(frozen=True)
class TensorEntry:
    """Where one tensor lives inside a safetensors file."""

    file: Path
    dtype: str
    shape: tuple[int, ...]
    start: int  # absolute byte offset in the file
    end: int


def read_header(path: Path) -> tuple[bytes, dict[str, Any]]:
    """The raw header bytes and the parsed header of a safetensors file."""
    with path.open("rb") as handle:
        (length,) = struct.unpack("<Q", handle.read(8))
        raw = handle.read(length)
    return raw, json.loads(raw)


def safetensors_files(folder: Path) -> list[Path]:
    """The safetensors shards of a checkpoint folder, in a stable order."""
    index = folder / "model.safetensors.index.json"
    if index.exists():
        weight_map = json.loads(index.read_text())["weight_map"]
        return sorted({folder / name for name in weight_map.values()})
    return sorted(folder.glob("*.safetensors"))


def tensor_index(folder: Path) -> dict[str, TensorEntry]:
    """Tensor name -> location, over every shard of the checkpoint in ``folder``."""
    files = safetensors_files(folder)
    if not files:
        raise AlignmentError("no_safetensors", f"no .safetensors files in {folder}")
    entries: dict[str, TensorEntry] = {}
    for file in files:
        entries.update(tensor_index_of_file(file))
    return entries


def read_tensor(entry: TensorEntry) -> torch.Tensor:
    """Read one tensor with a plain file read (no mmap), shaped as stored."""
    if entry.dtype not in _DTYPES:
        raise AlignmentError("unsupported_dtype", f"tensor dtype {entry.dtype} is not supported")
    buffer = bytearray(entry.end - entry.start)
    with entry.file.open("rb") as handle:
        handle.seek(entry.start)
        handle.readinto(buffer)
    if not buffer:
        return torch.empty(entry.shape, dtype=_DTYPES[entry.dtype])
    return torch.frombuffer(buffer, dtype=_DTYPES[entry.dtype]).reshape(entry.shape)


def checkpoint_fingerprint(folder: Path) -> str:
    """sha256 over every shard's header bytes, size and modification time.

    Cheap (no tensor data is read); a rebuilt or re-downloaded checkpoint gets a new
    fingerprint, so a cached direction is never reused for other weights.
    """
    digest = hashlib.sha256()
    for file in safetensors_files(folder):
        raw, _ = read_header(file)
        stat = file.stat()
        digest.update(file.name.encode() + b"\0" + raw)
        digest.update(f"{stat.st_size}:{stat.st_mtime_ns}".encode())
    return digest.hexdigest()


def resolve_model_path(model: str | Path) -> Path:
    """A local checkpoint folder as is; otherwise download a hub id's safetensors and configs."""
    path = Path(model)
    if path.is_dir():
        return path
    text = str(model)
    looks_like_hub_id = text.count("/") == 1 and not text.startswith((".", "/", "~"))
    if not looks_like_hub_id:
        raise AlignmentError("model_not_found", f"model folder {text!r} does not exist")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(text, allow_patterns=["*.safetensors", "*.json"]))
    except Exception as error:  # hub errors have many types; all mean "not available"
        raise AlignmentError(
            "model_not_found", f"model {text!r} is neither a local folder nor reachable: {error}"
        ) from error


def _check_architectures(base: Path, aligned: Path) -> None:
    keys = ("model_type", "hidden_size", "num_hidden_layers", "num_attention_heads")
    configs = []
    for folder in (base, aligned):
        config_file = folder / "config.json"
        configs.append(json.loads(config_file.read_text()) if config_file.exists() else None)
    if configs[0] is None or configs[1] is None:
        return
    differing = [k for k in keys if configs[0].get(k) != configs[1].get(k)]
    if differing:
        detail = ", ".join(f"{k}: {configs[0].get(k)} vs {configs[1].get(k)}" for k in differing)
        raise AlignmentError("architecture_mismatch", f"base and aligned models differ in {detail}")


def target_weight_names(entries: dict[str, TensorEntry], target_modules: Sequence[str]) -> set[str]:
    """Names of the 2-D ``<module>.weight`` tensors whose module's last part is a target."""
    names = set()
    for name, entry in entries.items():
        parts = name.split(".")
        is_target = len(parts) >= 2 and parts[-1] == "weight" and parts[-2] in target_modules
        if is_target and len(entry.shape) == 2:
            names.add(name)
    return names


def top_singular_value(matrix: torch.Tensor, iterations: int = 300, tol: float = 1e-7) -> float:
    """sigma_1 of ``matrix`` (m, n): exact for small matrices, power iteration otherwise.

    Power iteration on M^T M (or M M^T, the smaller side) costs two matrix-vector products
    per iteration, which keeps a 4096 x 4096 module well under a second on a CPU.
    """
    m = matrix.double() if min(matrix.shape) <= 256 else matrix.float()
    if min(m.shape) <= 256:
        return float(torch.linalg.matrix_norm(m, ord=2))
    if m.shape[0] < m.shape[1]:
        m = m.T
    generator = torch.Generator().manual_seed(0)
    vector = torch.randn(m.shape[1], generator=generator, dtype=m.dtype)
    vector /= vector.norm()
    estimate = 0.0
    for _ in range(iterations):
        product = m.T @ (m @ vector)
        norm = float(product.norm())
        if norm == 0.0:
            return 0.0
        vector = product / norm
        if abs(norm - estimate) <= tol * norm:
            estimate = norm
            break
        estimate = norm
    return estimate**0.5


@dataclass(frozen=True)
class ModuleStats:
    """Per-module facts about V."""

    frobenius_norm: float  # ||V||_F
    top_eigenvalue: float  # lambda_1 of C = V V^T / ||V||_F, i.e. sigma_1^2 / ||V||_F
    top_energy_share: float  # sigma_1^2 / ||V||_F^2: how much of V lies in one direction
    sigma_1: float  # the top singular value of V
    stable_rank: float  # ||V||_F^2 / sigma_1^2 (0 for V = 0): how many directions V "uses"
    # The fewest singular directions holding DEFAULT_SUBSPACE_ENERGY of ||V||_F^2, and the
    # share they hold; None when not in the artifact (written before these fields, or a module
    # larger than EXACT_SPECTRUM_MAX_DIM): alignment_subspaces computes them.
    k: int | None
    energy_top_k: float | None

    @classmethod
    def from_metadata(cls, values: dict[str, Any]) -> ModuleStats:
        """Read one module's stats; artifacts written before sigma_1 and k still load."""
        norm, top = float(values["frobenius_norm"]), float(values["top_eigenvalue"])
        share = float(values["top_energy_share"])
        sigma = values.get("sigma_1")
        stable_rank = values.get("stable_rank")
        k, energy = values.get("k"), values.get("energy_top_k")
        return cls(
            frobenius_norm=norm,
            top_eigenvalue=top,
            top_energy_share=share,
            # lambda_1 = sigma_1^2 / ||V||_F and share = sigma_1^2 / ||V||_F^2 give the rest.
            sigma_1=float(sigma) if sigma is not None else (top * norm) ** 0.5,
            stable_rank=float(stable_rank)
            if stable_rank is not None
            else (1.0 / share if share > 0 else 0.0),
            k=int(k) if k is not None else None,
            energy_top_k=float(energy) if energy is not None else None,
        )


@dataclass(frozen=True)
class AlignmentArtifact:
    """A saved alignment direction: the header facts, without the tensors."""

    path: Path
    modules: list[str]
    shapes: dict[str, list[int]]
    dtype: str
    target_modules: list[str]
    base_model: str
    aligned_model: str
    base_fingerprint: str
    aligned_fingerprint: str
    stats: dict[str, ModuleStats]
    # Singular directions stored per module beside V (``min(this, d_out, d_in)``); None for
    # artifacts written before the spectrum was stored.
    spectrum_rank: int | None = None

    def stored_rank(self, module: str) -> int:
        """How many singular directions of ``module``'s V the artifact stores (0: none)."""
        if self.spectrum_rank is None:
            return 0
        return min(self.spectrum_rank, *self.shapes[module])

    @property
    def max_top_eigenvalue(self) -> float:
        """The largest top eigenvalue of C over all modules."""
        return max((s.top_eigenvalue for s in self.stats.values()), default=0.0)

    @property
    def degenerate(self) -> bool:
        """True when C is nearly zero everywhere, so AsFT acts as plain L2 on the update."""
        return self.max_top_eigenvalue < DEGENERATE_EIGENVALUE

    @classmethod
    def load(cls, path: Path) -> AlignmentArtifact:
        """Read an artifact's metadata (the header only, no tensor data)."""
        _, header = read_header(path)
        meta = header.get("__metadata__", {})
        if meta.get("asft_format") not in _READABLE_FORMATS:
            raise AlignmentError("invalid_artifact", f"{path} is not an AsFT alignment artifact")
        stats = {
            name: ModuleStats.from_metadata(values)
            for name, values in json.loads(meta["stats"]).items()
        }
        return cls(
            path=path,
            modules=json.loads(meta["modules"]),
            shapes=json.loads(meta["shapes"]),
            dtype=meta["dtype"],
            target_modules=json.loads(meta["target_modules"]),
            base_model=meta["base_model"],
            aligned_model=meta["aligned_model"],
            base_fingerprint=meta["base_fingerprint"],
            aligned_fingerprint=meta["aligned_fingerprint"],
            stats=stats,
            spectrum_rank=int(meta["spectrum_rank"]) if "spectrum_rank" in meta else None,
        )

    def summary(self) -> dict[str, Any]:
        """JSON-ready facts for reports and the API."""
        return {
            "modules": len(self.modules),
            "dtype": self.dtype,
            "max_top_eigenvalue": self.max_top_eigenvalue,
            "degenerate": self.degenerate,
            "regime": regime(self),
            "subspace_energy": DEFAULT_SUBSPACE_ENERGY,
            "per_module": {
                name: {
                    "frobenius_norm": s.frobenius_norm,
                    "top_eigenvalue": s.top_eigenvalue,
                    "top_energy_share": s.top_energy_share,
                    "sigma_1": s.sigma_1,
                    "stable_rank": s.stable_rank,
                    "k": s.k,
                    "energy_top_k": s.energy_top_k,
                }
                for name, s in self.stats.items()
            },
        }


def _short(value: float) -> str:
    return f"{value:.2f}" if value >= 0.01 else f"{value:.1e}"


def regime(artifact: AlignmentArtifact) -> str:
    """One plain-words sentence: what the AsFT penalty does on this pair, and why.

    Read from the largest top eigenvalue lambda of C over the modules: a direction u_i is
    penalised (1 - lambda_i)^2 times as much as an orthogonal one (thresholds above).
    """
    top = artifact.max_top_eigenvalue
    weights = [s.top_eigenvalue for s in artifact.stats.values()]
    share = round(100 * (1 - top) ** 2)
    if top < L2_LIKE_EIGENVALUE:
        return (
            f"AsFT acts as plain L2 on this pair: the top eigenvalue of C is {_short(top)} at "
            f"most (< 1 leaves every direction penalised at least (1-{_short(top)})^2 = "
            f"{share}% as much as an orthogonal one)."
        )
    if top <= NEAR_PROJECTOR_EIGENVALUE:
        near = sum(L2_LIKE_EIGENVALUE <= w <= NEAR_PROJECTOR_EIGENVALUE for w in weights)
        return (
            f"AsFT acts as intended on this pair: the top eigenvalue of C is {top:.2f}, near 1 "
            f"in {near} of {len(weights)} modules, so updates along V's top directions are "
            f"nearly free (penalised ({top:.2f}-1)^2 = {share}% as much as an orthogonal one) "
            "while the other directions pay full L2."
        )
    if top <= INVERTED_EIGENVALUE:
        return (
            f"AsFT only partly frees V's directions on this pair: the top eigenvalue of C is "
            f"{top:.2f} (between {NEAR_PROJECTOR_EIGENVALUE} and {INVERTED_EIGENVALUE}), so "
            f"the top direction is penalised ({top:.2f}-1)^2 = {share}% as much as an "
            "orthogonal one: C overshoots a projector because ||V||_F is large."
        )
    above = sum(w > INVERTED_EIGENVALUE for w in weights)
    return (
        f"AsFT inverts on this pair: the top eigenvalue of C is {top:.2f} (> "
        f"{INVERTED_EIGENVALUE:g} in {above} of {len(weights)} modules), so updates along V's "
        f"top direction are penalised ({top:.2f}-1)^2 = {(top - 1) ** 2:.3g} times as much as "
        "an orthogonal one, more than plain L2 would: ||V||_F is too large for C to act as a "
        "projector."
    )


class StreamingSafetensorsWriter:
    """Writes a safetensors file one tensor at a time.

    The header comes first in the format but its metadata (statistics) is known only at the
    end, so header space is reserved up front and filled in on :meth:`close`; JSON allows
    the trailing spaces that pad it. The file appears atomically under its final name.
    """

    def __init__(
        self,
        path: Path,
        entries: Sequence[tuple[str, str, tuple[int, ...]]],
        metadata_reserve: int,
    ) -> None:
        """``entries``: (name, safetensors dtype, shape) in write order."""
        self.path = path
        self._tensors: dict[str, dict[str, Any]] = {}
        offset = 0
        for name, dtype, shape in entries:
            size = _element_size(dtype)
            for dim in shape:
                size *= dim
            self._tensors[name] = {
                "dtype": dtype,
                "shape": list(shape),
                "data_offsets": [offset, offset + size],
            }
            offset += size
        self._order = [name for name, _, _ in entries]
        self._next = 0
        body = json.dumps(self._tensors, separators=(",", ":"))
        # Round up to 8 bytes so tensor data stays aligned, as the reference writer does.
        self._header_size = (len(body) + metadata_reserve + 64 + 7) // 8 * 8
        path.parent.mkdir(parents=True, exist_ok=True)
        handle, temp = tempfile.mkstemp(prefix=f".{path.name}-", dir=path.parent)
        self._temp = Path(temp)
        self._file = os.fdopen(handle, "wb")
        self._file.write(struct.pack("<Q", self._header_size))
        self._file.write(b" " * self._header_size)

    def write(self, name: str, tensor: torch.Tensor) -> None:
        """Append the next tensor; names must come in the order given at construction."""
        expected = self._order[self._next]
        info = self._tensors[expected]
        if name != expected or list(tensor.shape) != info["shape"]:
            raise ValueError(
                f"expected {expected} {info['shape']}, got {name} {list(tensor.shape)}"
            )
        if _DTYPE_NAMES[tensor.dtype] != info["dtype"]:
            raise ValueError(f"{name}: dtype {tensor.dtype} does not match {info['dtype']}")
        data = tensor.detach().contiguous().cpu().reshape(-1).view(torch.uint8).numpy()
        self._file.write(memoryview(data))
        self._next += 1

    def close(self, metadata: dict[str, str]) -> None:
        """Fill in the header, flush to disk and move the file into place."""
        if self._next != len(self._order):
            raise ValueError(f"only {self._next} of {len(self._order)} tensors were written")
        header = json.dumps({"__metadata__": metadata, **self._tensors}, separators=(",", ":"))
        encoded = header.encode()
        if len(encoded) > self._header_size:
            raise ValueError("metadata is larger than the space reserved for it")
        self._file.seek(8)
        self._file.write(encoded + b" " * (self._header_size - len(encoded)))
        self._file.flush()
        os.fsync(self._file.fileno())
        self._file.close()
        os.replace(self._temp, self.path)

    def abort(self) -> None:
        """Drop the partial file."""
        self._file.close()
        self._temp.unlink(missing_ok=True)


def _element_size(dtype: str) -> int:
    return torch.empty((), dtype=_DTYPES[dtype]).element_size()


def compute_alignment_direction(
    base_model: str | Path,
    aligned_model: str | Path,
    output_path: Path,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dtype: str = "float32",
) -> AlignmentArtifact:
    """Compute V = W_aligned - W_base for the target modules and save it at ``output_path``.

    Streams tensor by tensor; each V is computed in fp32, measured, cast to ``dtype``
    (float32, float16 or bfloat16) and written before the next pair is read.
    """
    if dtype not in _TORCH_DTYPES:
        raise AlignmentError("unsupported_dtype", f"dtype must be one of {sorted(_TORCH_DTYPES)}")
    base_path, aligned_path = resolve_model_path(base_model), resolve_model_path(aligned_model)
    _check_architectures(base_path, aligned_path)
    base_entries, aligned_entries = tensor_index(base_path), tensor_index(aligned_path)
    base_names = target_weight_names(base_entries, target_modules)
    aligned_names = target_weight_names(aligned_entries, target_modules)
    if base_names != aligned_names:
        only_one = sorted(base_names ^ aligned_names)
        raise AlignmentError(
            "missing_module",
            f"target weights present in only one checkpoint: {', '.join(only_one[:5])}",
        )
    if not base_names:
        raise AlignmentError(
            "missing_module",
            f"no 2-D weight of the target modules {', '.join(target_modules)} was found",
        )
    names = sorted(base_names, key=_natural_key)
    for name in names:
        if base_entries[name].shape != aligned_entries[name].shape:
            raise AlignmentError(
                "shape_mismatch",
                f"{name}: base shape {base_entries[name].shape} vs aligned "
                f"{aligned_entries[name].shape}",
            )

    modules = [name.removesuffix(".weight") for name in names]

    def differences() -> Iterator[tuple[str, torch.Tensor]]:
        for module, name in zip(modules, names, strict=True):
            direction = read_tensor(aligned_entries[name]).float()
            direction -= read_tensor(base_entries[name]).float()
            yield module, direction
            del direction  # one V in memory at a time

    template = AlignmentArtifact(
        path=output_path,
        modules=modules,
        shapes={m: list(base_entries[n].shape) for m, n in zip(modules, names, strict=True)},
        dtype=dtype,
        target_modules=list(target_modules),
        base_model=str(base_model),
        aligned_model=str(aligned_model),
        base_fingerprint=checkpoint_fingerprint(base_path),
        aligned_fingerprint=checkpoint_fingerprint(aligned_path),
        stats={},
        spectrum_rank=SPECTRUM_RANK,
    )
    return _write_artifact(template, differences())


def _write_artifact(
    template: AlignmentArtifact, directions: Iterable[tuple[str, torch.Tensor]]
) -> AlignmentArtifact:
    """Stream ``directions`` ((module, V in fp32), in ``template.modules`` order) to
    ``template.path`` in ``template.dtype``, each V followed by its stored spectrum; returns
    the artifact with its statistics.
    """
    out_dtype = _TORCH_DTYPES[template.dtype]
    entries: list[tuple[str, str, tuple[int, ...]]] = []
    for module in template.modules:
        shape = tuple(template.shapes[module])
        entries.append((module, _DTYPE_NAMES[out_dtype], shape))
        rank = template.stored_rank(module)
        if rank:
            basis_name, sigma_name = spectrum_names(module)
            entries.append((basis_name, "F32", (shape[0], rank)))
            entries.append((sigma_name, "F64", (min(rank + 1, *shape),)))
    writer = StreamingSafetensorsWriter(
        template.path,
        entries,
        # Each module name appears three times (modules, shapes, stats), next to its numbers.
        metadata_reserve=2048 + sum(3 * len(m) + 448 for m in template.modules),
    )
    stats: dict[str, ModuleStats] = {}
    try:
        for module, direction in directions:
            rank = template.stored_rank(module)
            stats[module], spectrum = _module_stats(direction, rank)
            writer.write(module, direction.to(out_dtype))
            if spectrum is not None:
                basis_name, sigma_name = spectrum_names(module)
                writer.write(basis_name, spectrum[0])
                writer.write(sigma_name, spectrum[1])
            del direction
        artifact = replace(template, stats=stats)
        writer.close(_metadata(artifact))
    except BaseException:
        writer.abort()
        raise
    return artifact


def spectrum_names(module: str) -> tuple[str, str]:
    """The artifact's tensor names of ``module``'s stored basis and singular values."""
    return f"{module}/basis", f"{module}/sigma"


def _module_stats(
    direction: torch.Tensor, rank: int = 0
) -> tuple[ModuleStats, tuple[torch.Tensor, torch.Tensor] | None]:
    """V's statistics and, with ``rank``, its top-``rank`` left singular vectors (fp32,
    (d_out, rank)) and top ``rank + 1`` singular values (fp64; fewer when V is smaller)."""
    small = direction.numel() < 1 << 20
    norm = float(torch.linalg.matrix_norm(direction.double() if small else direction))
    spectrum = None
    if rank:
        spectrum = _top_spectrum(direction, rank)
    if norm == 0.0:
        zero = ModuleStats(0.0, 0.0, 0.0, sigma_1=0.0, stable_rank=0.0, k=0, energy_top_k=0.0)
        return zero, spectrum
    k: int | None = None
    energy: float | None = None
    if min(direction.shape) <= EXACT_SPECTRUM_MAX_DIM:
        # The exact spectrum's singular values are all there: reuse them when computed.
        singular_values = (
            spectrum[1]
            if spectrum is not None and spectrum[1].numel() == min(direction.shape)
            else torch.linalg.svdvals(direction.double() if small else direction.float())
        )
        sigma = float(singular_values[0])
        k = energy_rank(singular_values, DEFAULT_SUBSPACE_ENERGY)
        energy = _energy_share(singular_values, k)
    else:
        sigma = top_singular_value(direction)
    stats = ModuleStats(
        frobenius_norm=norm,
        top_eigenvalue=sigma**2 / norm,
        top_energy_share=sigma**2 / norm**2,
        sigma_1=sigma,
        stable_rank=norm**2 / sigma**2,
        k=k,
        energy_top_k=energy,
    )
    return stats, spectrum


def _top_spectrum(direction: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-``rank`` left singular vectors and top ``rank + 1`` singular values of V: exact SVD
    up to EXACT_SPECTRUM_MAX_DIM (fp64 for small V), randomized beyond."""
    smallest = min(direction.shape)
    if smallest <= EXACT_SPECTRUM_MAX_DIM:
        small = direction.numel() < 1 << 20
        u, singular_values, _ = torch.linalg.svd(
            direction.double() if small else direction.float(), full_matrices=False
        )
    else:
        generator_state = torch.random.get_rng_state()
        torch.manual_seed(0)  # the same artifact bytes for the same pair
        try:
            u, singular_values, _ = torch.svd_lowrank(
                direction.float(),
                q=min(rank + 1 + _RANDOMIZED_OVERSAMPLE, smallest),
                niter=_RANDOMIZED_ITERATIONS,
            )
        finally:
            torch.random.set_rng_state(generator_state)
    basis = u[:, :rank].float().contiguous()
    return basis, singular_values[: rank + 1].double().contiguous()


def _energy_share(singular_values: torch.Tensor, k: int) -> float:
    """sum_{i<k} sigma_i^2 / sum_i sigma_i^2 (0 for an all-zero spectrum)."""
    energies = singular_values.double() ** 2
    total = float(energies.sum())
    return float(energies[:k].sum()) / total if total > 0 else 0.0


def _metadata(artifact: AlignmentArtifact) -> dict[str, str]:
    def floats(value: float) -> str:
        return f"{value:.9e}"

    def number(value: float | int | None) -> float | int | None:
        return value if value is None or isinstance(value, int) else float(floats(value))

    return {
        "asft_format": str(FORMAT_VERSION),
        "modules": json.dumps(artifact.modules),
        "shapes": json.dumps(artifact.shapes),
        "dtype": artifact.dtype,
        "target_modules": json.dumps(artifact.target_modules),
        "base_model": artifact.base_model,
        "aligned_model": artifact.aligned_model,
        "base_fingerprint": artifact.base_fingerprint,
        "aligned_fingerprint": artifact.aligned_fingerprint,
        "stats": json.dumps(
            {
                name: {key: number(value) for key, value in vars(s).items()}
                for name, s in artifact.stats.items()
            }
        ),
        "max_top_eigenvalue": floats(artifact.max_top_eigenvalue),
        "degenerate": json.dumps(artifact.degenerate),
        **(
            {"spectrum_rank": str(artifact.spectrum_rank)}
            if artifact.spectrum_rank is not None
            else {}
        ),
    }


def _natural_key(name: str) -> list[Any]:
    return [int(part) if part.isdigit() else part for part in name.split(".")]


def alignment_cache_key(
    base_model: str,
    aligned_model: str,
    target_modules: Iterable[str],
    dtype: str,
    base_fingerprint: str,
    aligned_fingerprint: str,
) -> str:
    """Hex digest naming the cached direction of one model pair, module set and dtype."""
    payload = json.dumps(
        {
            "format": FORMAT_VERSION,
            "base": base_model,
            "aligned": aligned_model,
            "modules": sorted(target_modules),
            "dtype": dtype,
            "base_fingerprint": base_fingerprint,
            "aligned_fingerprint": aligned_fingerprint,
        },
        sort_keys=True,
    )
    return hashlib.sha256(payload.encode()).hexdigest()[:32]


def get_or_compute_alignment(
    base_model: str | Path,
    aligned_model: str | Path,
    cache_dir: Path,
    target_modules: Sequence[str] = DEFAULT_TARGET_MODULES,
    dtype: str = "float32",
) -> AlignmentArtifact:
    """The cached direction for this pair, computing it once.

    A file lock per cache key makes concurrent workers wait for one computation instead of
    each doing it.
    """
    from filelock import FileLock

    base_path, aligned_path = resolve_model_path(base_model), resolve_model_path(aligned_model)
    key = alignment_cache_key(
        str(base_model),
        str(aligned_model),
        target_modules,
        dtype,
        checkpoint_fingerprint(base_path),
        checkpoint_fingerprint(aligned_path),
    )
    cache_dir.mkdir(parents=True, exist_ok=True)
    path = cache_dir / f"{key}.safetensors"
    with FileLock(str(cache_dir / f"{key}.lock")):
        if path.exists():
            return AlignmentArtifact.load(path)
        # Only the lock's holder writes this key: a temporary file is a killed writer's.
        for stale in cache_dir.glob(f".{path.name}-*"):
            stale.unlink(missing_ok=True)
        return compute_alignment_direction(base_path, aligned_path, path, target_modules, dtype)


def load_alignment_directions(
    path: Path,
    device: torch.device | str = "cpu",
    dtype: torch.dtype = torch.float32,
    modules: Iterable[str] | None = None,
) -> dict[str, torch.Tensor]:
    """Module name -> V: (d_out, d_in) from an artifact, on ``device`` in ``dtype``.

    With ``modules``, only those are loaded, and a missing one is an error.
    """
    return dict(DirectionReader(path, modules, device, dtype))


class DirectionReader(Mapping[str, torch.Tensor]):
    """Module name -> V read from the artifact when asked for, so one V at a time is in
    memory (Safe LoRA's projection, an exact penalty kept on the host)."""

    def __init__(
        self,
        path: Path,
        modules: Iterable[str] | None = None,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        """Checks that every one of ``modules`` (default: all) is in the artifact."""
        self.artifact = AlignmentArtifact.load(path)
        self._modules = list(modules) if modules is not None else self.artifact.modules
        missing = sorted(set(self._modules) - set(self.artifact.modules))
        if missing:
            raise AlignmentError(
                "missing_module",
                f"the alignment artifact has no direction for: {', '.join(missing[:5])}",
            )
        self.entries = tensor_index_of_file(path)
        self._device, self._dtype = device, dtype

    def __getitem__(self, module: str) -> torch.Tensor:
        if module not in self._modules:
            raise KeyError(module)
        return read_tensor(self.entries[module]).to(device=self._device, dtype=self._dtype)

    def __iter__(self) -> Iterator[str]:
        return iter(self._modules)

    def __len__(self) -> int:
        return len(self._modules)


def alignment_low_rank(
    path: Path, k: int, modules: Iterable[str] | None = None
) -> dict[str, LowRankDirection]:
    """Module name -> the top-``k`` eigenpairs of its C (a low-rank penalty's factors), fp32.

    Read from the spectrum the artifact stores beside each V, so V itself is not read. A
    module whose stored spectrum is shorter than ``k`` (or an artifact written before spectra
    were stored) has its V read and decomposed, one module at a time.
    """
    from asft_core.penalty import low_rank_direction

    if k < 1:
        raise ValueError(f"k must be at least 1, got {k}")
    reader = DirectionReader(path, modules)
    artifact, entries = reader.artifact, reader.entries
    factors = {}
    for module in reader:
        stored = artifact.stored_rank(module)
        if k > stored and stored < min(artifact.shapes[module]):
            factors[module] = low_rank_direction(reader[module], k)
            continue
        basis_name, sigma_name = spectrum_names(module)
        keep = min(k, stored)
        singular_values = read_tensor(entries[sigma_name])
        norm = artifact.stats[module].frobenius_norm
        eigenvalues = singular_values**2 / norm if norm > 0 else torch.zeros_like(singular_values)
        factors[module] = LowRankDirection(
            basis=read_tensor(entries[basis_name])[:, :keep].contiguous(),
            eigenvalues=eigenvalues[:keep].float().contiguous(),
            spectral_error=float(eigenvalues[keep]) if keep < eigenvalues.numel() else 0.0,
            top_eigenvalue=float(eigenvalues[0]) if eigenvalues.numel() else 0.0,
        )
    return factors


def tensor_index_of_file(path: Path) -> dict[str, TensorEntry]:
    """Tensor name -> location for a single safetensors file."""
    raw, header = read_header(path)
    data_start = 8 + len(raw)
    return {
        name: TensorEntry(
            path,
            info["dtype"],
            tuple(info["shape"]),
            data_start + info["data_offsets"][0],
            data_start + info["data_offsets"][1],
        )
        for name, info in header.items()
        if name != "__metadata__"
    }


def save_directions(
    path: Path, directions: dict[str, torch.Tensor], like: AlignmentArtifact
) -> AlignmentArtifact:
    """Write ``directions`` (module -> V) as an artifact with ``like``'s provenance fields.

    For controls and tests that need a direction other than a real model pair's (say, V with
    its singular vectors rotated at random); statistics are recomputed from the tensors.
    """
    template = replace(
        like,
        path=path,
        modules=list(directions),
        shapes={m: list(v.shape) for m, v in directions.items()},
        stats={},
        spectrum_rank=SPECTRUM_RANK,
    )
    return _write_artifact(template, ((m, v.float()) for m, v in directions.items()))


@dataclass(frozen=True)
class Subspace:
    """The top singular directions of one module's V, as many as hold a share tau of its energy.

    Attributes:
        basis: U_k, (d_out, k) float32: the top-k left singular vectors of V (orthonormal
            columns up to float32 rounding). k = 0 only for V = 0.
        singular_values: every sigma_i of V, (min(d_out, d_in),) float64, descending.
        k: the number of columns, energy_rank(singular_values, tau), capped by ``max_k``.
        tau: the share of ||V||_F^2 the full (uncapped) k was chosen to hold.
    """

    basis: torch.Tensor
    singular_values: torch.Tensor
    k: int
    tau: float

    @property
    def energy(self) -> float:
        """The share of ||V||_F^2 held by the k directions of ``basis``."""
        return _energy_share(self.singular_values, self.k)


SUBSPACE_FORMAT_VERSION = 1


def subspace_sidecar_path(path: Path, tau: float) -> Path:
    """Where :func:`alignment_subspaces` caches the subspaces of the artifact at ``path``."""
    return path.with_name(f"{path.stem}.subspace-{tau:g}.safetensors")


def alignment_subspaces(
    path: Path,
    tau: float = DEFAULT_SUBSPACE_ENERGY,
    max_k: int | None = None,
    modules: Iterable[str] | None = None,
) -> dict[str, Subspace]:
    """Module name -> the top-k left singular vectors of its V, k holding ``tau`` of the energy.

    Each V is read from the artifact at ``path`` one at a time and decomposed by an exact SVD
    (float64 up to EXACT_SPECTRUM_MAX_DIM, float32 beyond). The result is cached beside the
    artifact (:func:`subspace_sidecar_path`), written atomically under a file lock and tied
    to the artifact's fingerprint, so later calls read it instead of recomputing; asking for
    modules the sidecar lacks computes just those and rewrites it.

    Args:
        path: an alignment artifact.
        tau: share of ||V||_F^2 to hold, in (0, 1].
        max_k: keep at most this many directions (the sidecar keeps them all).
        modules: the modules wanted (default: all of the artifact's).
    """
    from filelock import FileLock

    if not 0.0 < tau <= 1.0:
        raise ValueError(f"tau must be in (0, 1], got {tau}")
    if max_k is not None and max_k < 0:
        raise ValueError(f"max_k must be at least 0, got {max_k}")
    reader = DirectionReader(path, modules)  # fp32: exact for every artifact dtype
    wanted = list(reader)
    sidecar = subspace_sidecar_path(path, tau)
    fingerprint = _file_fingerprint(path)
    with FileLock(str(sidecar.with_name(sidecar.name + ".lock"))):
        cached = _read_sidecar(sidecar, fingerprint, tau)
        todo = [name for name in wanted if name not in cached]
        if todo:
            for name in todo:  # one V in memory at a time
                cached[name] = _top_subspace(reader[name], tau)
            _write_sidecar(sidecar, cached, fingerprint, tau)
    subspaces = {}
    for name in wanted:
        basis, singular_values = cached[name]
        if max_k is not None:
            basis = basis[:, :max_k]
        subspaces[name] = Subspace(basis, singular_values, basis.shape[1], tau)
    return subspaces


def _top_subspace(direction: torch.Tensor, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
    exact = min(direction.shape) <= EXACT_SPECTRUM_MAX_DIM
    u, singular_values, _ = torch.linalg.svd(
        direction.double() if exact else direction.float(), full_matrices=False
    )
    k = energy_rank(singular_values, tau)
    return u[:, :k].float().contiguous(), singular_values.double()


def _file_fingerprint(path: Path) -> str:
    """sha256 of a file's header, size and modification time: changes when it is rewritten."""
    raw, _ = read_header(path)
    stat = path.stat()
    return hashlib.sha256(raw + f"{stat.st_size}:{stat.st_mtime_ns}".encode()).hexdigest()


def _read_sidecar(
    sidecar: Path, fingerprint: str, tau: float
) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """The sidecar's (basis, singular values) per module; empty if absent, stale or another
    tau's (two taus can share a file name once rounded)."""
    if not sidecar.exists():
        return {}
    try:
        _, header = read_header(sidecar)
        meta = header.get("__metadata__", {})
        if (
            meta.get("asft_subspace_format") != str(SUBSPACE_FORMAT_VERSION)
            or meta.get("artifact_fingerprint") != fingerprint
            or meta.get("tau") != repr(tau)
        ):
            return {}
        entries = tensor_index_of_file(sidecar)
        return {
            name: (read_tensor(entries[f"{name}/basis"]), read_tensor(entries[f"{name}/sigma"]))
            for name in json.loads(meta["modules"])
        }
    except (OSError, ValueError, KeyError, struct.error):
        return {}  # unreadable (say, cut short by a crash): it is only a cache, recompute


def _write_sidecar(
    sidecar: Path,
    subspaces: dict[str, tuple[torch.Tensor, torch.Tensor]],
    fingerprint: str,
    tau: float,
) -> None:
    from safetensors.torch import save_file

    tensors = {}
    for name, (basis, singular_values) in subspaces.items():
        tensors[f"{name}/basis"] = basis.contiguous()
        tensors[f"{name}/sigma"] = singular_values.contiguous()
    metadata = {
        "asft_subspace_format": str(SUBSPACE_FORMAT_VERSION),
        "artifact_fingerprint": fingerprint,
        "tau": repr(tau),
        "modules": json.dumps(list(subspaces)),
    }
    handle, temp = tempfile.mkstemp(prefix=f".{sidecar.name}-", dir=sidecar.parent)
    os.close(handle)
    try:
        save_file(tensors, temp, metadata=metadata)
        with open(temp, "rb") as written:
            os.fsync(written.fileno())
        os.replace(temp, sidecar)
    except BaseException:
        Path(temp).unlink(missing_ok=True)
        raise
