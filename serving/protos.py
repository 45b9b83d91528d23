"""Feast's protos without importing the ``feast`` package.

Importing anything under ``feast.protos`` first runs ``feast/__init__.py``, which loads
pandas, SQLAlchemy, FastAPI and the whole SDK: seconds of start-up and hundreds of MB
that neither a model service calling the server nor the server itself needs. This module
reads the serialized file descriptors out of Feast's generated ``*_pb2.py`` files (a regex
and ``ast.literal_eval`` on one literal, never executing them), adds them with their
dependencies to a private descriptor pool, and builds the message classes from it, so
both sides always speak exactly the installed Feast's wire format, for a few milliseconds.

:func:`message` gives any Feast message class by full name (``feast.core.Registry``),
loading its ``.proto`` file and dependencies on first use.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import re
import threading
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pb2, descriptor_pool, message_factory

SERVING_SERVICE = "feast.serving.ServingService"
GET_ONLINE_FEATURES = f"/{SERVING_SERVICE}/GetOnlineFeatures"
GET_FEAST_SERVING_INFO = f"/{SERVING_SERVICE}/GetFeastServingInfo"

_SERIALIZED = re.compile(rb"AddSerializedFile\((b'(?:[^'\\]|\\.)*')\)")


def _feast_root() -> Path:
    spec = importlib.util.find_spec("feast")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("feast is not installed; install it with pip install 'feast==0.67.*'")
    return Path(next(iter(spec.submodule_search_locations))) / "protos"


def _serialized_file(proto_name: str) -> bytes:
    """The serialized FileDescriptorProto of ``proto_name`` (``feast/core/Registry.proto``)."""
    if proto_name.startswith("google/protobuf/"):
        module = "google.protobuf." + proto_name[len("google/protobuf/") : -len(".proto")] + "_pb2"
        return bytes(importlib.import_module(module).DESCRIPTOR.serialized_pb)
    path = _feast_root() / (proto_name[: -len(".proto")] + "_pb2.py")
    found = _SERIALIZED.search(path.read_bytes())
    if found is None:
        raise ImportError(f"{path} holds no serialized file descriptor; is the feast install complete?")
    data = ast.literal_eval(found.group(1).decode("latin-1"))
    assert isinstance(data, bytes)
    return data


pool = descriptor_pool.DescriptorPool()
_loaded: set[str] = set()
_lock = threading.Lock()


def load_file(proto_name: str, serialized: bytes | None = None) -> None:
    """Add ``proto_name`` and (first) its dependencies to :data:`pool`, once."""
    with _lock:
        _load(proto_name, serialized)


def _load(proto_name: str, serialized: bytes | None = None) -> None:
    if proto_name in _loaded:
        return
    data = serialized if serialized is not None else _serialized_file(proto_name)
    file_proto = descriptor_pb2.FileDescriptorProto.FromString(data)
    for dependency in file_proto.dependency:
        _load(dependency)
    pool.AddSerializedFile(data)
    _loaded.add(proto_name)


def message(full_name: str, proto_name: str) -> Any:
    """The message class ``full_name``, defined in ``proto_name``."""
    load_file(proto_name)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(full_name))


def enum_values(full_name: str) -> dict[str, int]:
    """Name -> number of a loaded enum (``feast.serving.FieldStatus``)."""
    return {v.name: v.number for v in pool.FindEnumTypeByName(full_name).values}


_SERVING = "feast/serving/ServingService.proto"
_VALUE = "feast/types/Value.proto"
Value: Any = message("feast.types.Value", _VALUE)
RepeatedValue: Any = message("feast.types.RepeatedValue", _VALUE)
GetOnlineFeaturesRequest: Any = message("feast.serving.GetOnlineFeaturesRequest", _SERVING)
GetOnlineFeaturesResponse: Any = message("feast.serving.GetOnlineFeaturesResponse", _SERVING)
GetFeastServingInfoRequest: Any = message("feast.serving.GetFeastServingInfoRequest", _SERVING)
GetFeastServingInfoResponse: Any = message("feast.serving.GetFeastServingInfoResponse", _SERVING)

FIELD_STATUS: dict[str, int] = enum_values("feast.serving.FieldStatus")
FIELD_STATUS_NAMES: dict[int, str] = {number: name for name, number in FIELD_STATUS.items()}
VALUE_TYPES: dict[str, int] = enum_values("feast.types.ValueType.Enum")
VALUE_TYPE_NAMES: dict[int, str] = {number: name for name, number in VALUE_TYPES.items()}
