"""YAML device configs (dpllama/configs/*.yaml, package data): which device, queue mode, build options, work-group sizes.

The schema is SCHEMA below; docs/CONFIG.md explains each key. Loading checks every key and type and
that a matching device is present, and fails with one line naming the file, the key and what was
expected.
"""
from __future__ import annotations

import copy
from dataclasses import dataclass, field
from importlib.resources import files
from pathlib import Path

import yaml

from dpllama.errors import DpllamaError
from dpllama.fileio import check_input
from dpllama.runtime.device import Device, choose, list_devices, select_device

CONFIG_DIR = files("dpllama") / "configs"   # the shipped configs, in the package in a checkout and installed

# key -> (type, default); nested dicts are sections. Work-group sizes are per kernel family.
SCHEMA = {
    "name": (str, "default"),
    "description": (str, ""),
    "match": {
        "type": (str, ""),          # cpu | gpu | accelerator
        "platform": (str, ""),      # platform name contains (case-insensitive)
        "vendor": (str, ""),        # device vendor contains
        "name": (str, ""),          # device name contains
        "isa": (str, ""),           # kernel path contains: avx512(-vnni), avx2, portable (per-ISA CPU configs)
    },
    "queue": {
        "out_of_order": (bool, True),   # used only when the device supports it
        "profiling": (bool, False),
    },
    "build_options": (list, ["-cl-mad-enable"]),
    "work_group": {
        "gemv": (int, 64),          # work-items splitting one row tile's columns in the matrix kernels
        "tile_rows": (int, 4),      # rows per tile: the vector lanes of a matrix kernel's work-item (kernels' TILE_ROWS)
        "reduce": (int, 64),        # single work-group reductions: the draw (gemv > 1), devices --check
        "attention": (int, 64),     # threads per head and token in attention
        "attention_positions": (int, 16),  # positions per vector in attention scores (2, 4, 8 or 16)
        "key_block": (int, 0),      # KV cache keys in blocks of this many positions; 0: one block (attention.h)
        "attention_span": (int, 512),  # attention 1: a row's positions in spans of this many (attention.h)
        "decode_tiles": (int, 1),   # row tiles a work-group takes at a time when decoding
        "decode_rows": (int, 1),    # passes of up to this many rows (batches of decode steps) use decode's kernels
        "matrix_groups": (int, 2),  # gemv 1 (CPUs): matrix launches' work-groups per compute unit
        "prefill_tokens": (int, 8),  # prompt tokens per work-group in prefill matrix kernels
        "prefill_tiles": (int, 1),  # row tiles per work-group in prefill
        "prefill_chunk": (int, 64),  # prompt tokens per forward pass in prefill
        "decode_prefetch": (int, 128),   # x86 CPUs: columns ahead that decode's matrix kernels prefetch weights (0: none)
        "prefill_prefetch": (int, 512),  # the same for passes of several rows (prefill, batches)
    },
    "fuse": {
        # decode: attention inside the QKV launch, a work-group per KV head, for models with at least this
        # many KV heads (0: never; fewer work-groups than cores would idle some)
        "attention_min_kv_heads": (int, 0),
        # the layers of a pass in one launch (matrix.cl's layers) on devices of up to this many compute units
        # (0: never), where work-groups are single work-items (CPUs)
        "layer_max_units": (int, 0),
    },
    "memory": {
        "max_alloc_mb": (int, 0),   # 0: the device's own limit
    },
}
TYPES = {"cpu", "gpu", "accelerator", ""}
RENAMED = {"work_group.rows_per_group": "work_group.tile_rows", "work_group.norm": "work_group.reduce"}  # in 0.2
VECTOR_WIDTHS = (2, 4, 8, 16)


@dataclass
class DeviceConfig:
    values: dict
    path: str = "<defaults>"
    extras: dict = field(default_factory=dict)

    def __getitem__(self, key: str):
        return self.values[key]

    @property
    def selector(self) -> str:
        m = self.values["match"]
        terms = [m["type"]] if m["type"] else []
        terms += [f"platform={m['platform']}"] if m["platform"] else []
        terms += [f"vendor={m['vendor']}"] if m["vendor"] else []
        terms += [f"name~{m['name']}"] if m["name"] else []
        terms += [f"isa={m['isa']}"] if m["isa"] else []     # last: it runs the probe, the others do not
        return ",".join(terms)

    def work_group(self, kernel: str) -> int:
        return self.values["work_group"][kernel]


def defaults(schema=SCHEMA) -> dict:
    return {k: defaults(v) if isinstance(v, dict) else copy.deepcopy(v[1]) for k, v in schema.items()}


def _check(data, schema: dict, path: str, prefix: str = "") -> dict:
    if not isinstance(data, dict):
        raise DpllamaError(f"{path}: {prefix.rstrip('.') or 'top level'} must be a mapping, found {type(data).__name__}")
    out = defaults(schema)
    for key, value in data.items():
        full = f"{prefix}{key}"
        if full in RENAMED:
            raise DpllamaError(f"{path}: key {full!r} is now {RENAMED[full]!r} (same meaning)")
        if key not in schema:
            raise DpllamaError(f"{path}: unknown key {full!r} (expected one of: {', '.join(schema)})")
        spec = schema[key]
        if isinstance(spec, dict):
            out[key] = _check(value, spec, path, full + ".")
            continue
        typ = spec[0]
        if not isinstance(value, typ) or (typ is int and isinstance(value, bool)):
            raise DpllamaError(f"{path}: key {full!r} must be {typ.__name__}, found {type(value).__name__} {value!r}")
        if typ is int and value < 0:
            raise DpllamaError(f"{path}: key {full!r} must be >= 0, found {value}")
        # kernels take sizes as 32-bit ints, and no device has work-groups of 65536
        top = 1 << 16 if prefix == "work_group." else 1 << 31
        if typ is int and value >= top:
            raise DpllamaError(f"{path}: key {full!r} must be below {top}, found {value}")
        if typ is list and not all(isinstance(v, str) for v in value):
            raise DpllamaError(f"{path}: key {full!r} must be a list of strings, found {value!r}")
        out[key] = value
    return out


def parse_config(text: str, path: str = "<string>") -> DeviceConfig:
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        problem = str(getattr(e, "problem", None) or e).splitlines()[0]    # the reader's errors run on a second line
        raise DpllamaError(f"{path}:{where} not valid YAML: {problem}") from None
    except RecursionError:      # PyYAML composes nested collections recursively
        raise DpllamaError(f"{path}: not a config: nested too deeply") from None
    except ValueError as e:     # an integer literal beyond Python's digit limit
        raise DpllamaError(f"{path}: not a config: {e}") from None
    values = _check(data if data is not None else {}, SCHEMA, path)
    if values["match"]["type"] not in TYPES:
        raise DpllamaError(f"{path}: key 'match.type' must be one of cpu, gpu, accelerator, "
                           f"found {values['match']['type']!r}")
    for k, v in values["match"].items():
        if "," in v:    # the match becomes a comma-separated selector; AMD's vendor string has a comma
            raise DpllamaError(f"{path}: key 'match.{k}' must not contain ',' (values match as substrings, "
                               f"{v.split(',')[0].strip()!r} is enough), found {v!r}")
    for k, n in values["work_group"].items():
        if n == 0 and k not in ("key_block", "decode_prefetch", "prefill_prefetch"):
            raise DpllamaError(f"{path}: key 'work_group.{k}' must be a positive integer, found 0")
    for k in ("gemv", "reduce", "attention"):     # group_sum/group_max (common.h) halve the group each step
        n = values["work_group"][k]
        if n & (n - 1):
            raise DpllamaError(f"{path}: key 'work_group.{k}' must be a power of two, found {n}")
    if values["work_group"]["prefill_tokens"] < 2:     # 1 token per work-group is the decode build
        raise DpllamaError(f"{path}: key 'work_group.prefill_tokens' must be at least 2, "
                           f"found {values['work_group']['prefill_tokens']}")
    for k in ("tile_rows", "attention_positions"):     # lanes of an OpenCL vector type
        n = values["work_group"][k]
        if n not in VECTOR_WIDTHS:
            raise DpllamaError(f"{path}: key 'work_group.{k}' must be one of 2, 4, 8, 16 (an OpenCL vector "
                               f"width), found {n}")
    block, positions = values["work_group"]["key_block"], values["work_group"]["attention_positions"]
    if block % positions:       # a score vector's positions lie in one block
        raise DpllamaError(f"{path}: key 'work_group.key_block' must be 0 or a multiple of attention_positions "
                           f"({positions}), found {block}")
    span, step = values["work_group"]["attention_span"], max(positions, 4)
    if span % step:     # a span's score vectors and its values' runs of 2 or 4 chains end at its end (attention.h)
        raise DpllamaError(f"{path}: key 'work_group.attention_span' must be a multiple of attention_positions "
                           f"and of 4 ({step}), found {span}")
    return DeviceConfig(values, path)


def shipped_configs() -> dict:
    """Name -> file of every shipped config, in file name order (the order shipped_config_for tries them)."""
    return {f.name.removesuffix(".yaml"): f for f in sorted(CONFIG_DIR.iterdir(), key=lambda f: f.name)
            if f.name.endswith(".yaml")}


def load_config(path: str | Path) -> DeviceConfig:
    p = Path(path)
    check_input(p)
    if not p.is_file():
        shipped = shipped_configs()
        if p.name not in shipped:
            raise DpllamaError(f"{path}: config file not found (shipped configs: {', '.join(sorted(shipped))})")
        p = shipped[p.name]     # `--config nvidia` names a shipped config
    try:
        text = p.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise DpllamaError(f"{p}: not a YAML text file (byte {e.object[e.start]:#04x} at offset {e.start} is not "
                           f"UTF-8)") from None
    except OSError as e:
        raise DpllamaError(f"{p}: cannot read config: {e.strerror}") from None
    return parse_config(text, str(p))


def config_device(cfg: DeviceConfig, devices: list[Device] | None = None) -> tuple[Device, dict[int, str]]:
    """The device a config's `match` section names; an error naming the file when none is present."""
    devices = devices if devices is not None else list_devices()
    if not cfg.selector:    # no `match`: the choice falls to $DPLLAMA_DEVICE, then the best device
        return select_device(None, devices)
    try:
        return choose(devices, cfg.selector, "config")
    except DpllamaError as e:
        raise DpllamaError(f"{cfg.path}: key 'match' ({cfg.selector}): no such device present; {e}") from None


def shipped_config_for(device: Device) -> DeviceConfig:
    """The first shipped config whose `match` fits the device, else the built-in defaults."""
    from dpllama.runtime.device import matches
    for p in shipped_configs().values():
        cfg = load_config(p)
        if cfg.selector and matches(cfg.selector, device):
            return cfg
    return DeviceConfig(defaults())


def dump_config(cfg_values: dict) -> str:
    return yaml.safe_dump(cfg_values, sort_keys=False)
