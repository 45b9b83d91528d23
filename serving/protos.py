"""Feast's serving protos for the client, without importing the ``feast`` package.

Importing anything under ``feast.protos`` first runs ``feast/__init__.py``, which loads
pandas, SQLAlchemy, FastAPI and the whole SDK: seconds of start-up and hundreds of MB
that a model service calling the server does not need. This module reads the serialized
file descriptors out of Feast's generated ``*_pb2.py`` files (parsing, not executing
them) and builds the message classes in a private descriptor pool, so the client always
speaks exactly the installed Feast's wire format, at the cost of a few milliseconds.

The server uses Feast's own generated modules (it needs the SDK for the registry anyway).
"""

from __future__ import annotations

import ast
import importlib.util
from pathlib import Path
from typing import Any

from google.protobuf import descriptor_pool, message_factory, timestamp_pb2

SERVING_SERVICE = "feast.serving.ServingService"
GET_ONLINE_FEATURES = f"/{SERVING_SERVICE}/GetOnlineFeatures"
GET_FEAST_SERVING_INFO = f"/{SERVING_SERVICE}/GetFeastServingInfo"


def _feast_protos_dir() -> Path:
    spec = importlib.util.find_spec("feast")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("feast is not installed; install it with pip install 'feast==0.67.*'")
    return Path(next(iter(spec.submodule_search_locations))) / "protos" / "feast"


def _serialized_file(relative: str) -> bytes:
    """The ``AddSerializedFile(b'...')`` argument of one of Feast's generated modules."""
    path = _feast_protos_dir() / relative
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr == "AddSerializedFile"
        ):
            data = ast.literal_eval(node.args[0])
            if isinstance(data, bytes):
                return data
    raise ImportError(f"{path} holds no serialized file descriptor; is the feast install complete?")


_pool = descriptor_pool.DescriptorPool()
_pool.AddSerializedFile(timestamp_pb2.DESCRIPTOR.serialized_pb)
_pool.AddSerializedFile(_serialized_file("types/Value_pb2.py"))
_pool.AddSerializedFile(_serialized_file("serving/ServingService_pb2.py"))


def _message(full_name: str) -> Any:
    return message_factory.GetMessageClass(_pool.FindMessageTypeByName(full_name))


Value: Any = _message("feast.types.Value")
RepeatedValue: Any = _message("feast.types.RepeatedValue")
GetOnlineFeaturesRequest: Any = _message("feast.serving.GetOnlineFeaturesRequest")
GetOnlineFeaturesResponse: Any = _message("feast.serving.GetOnlineFeaturesResponse")
GetFeastServingInfoRequest: Any = _message("feast.serving.GetFeastServingInfoRequest")
GetFeastServingInfoResponse: Any = _message("feast.serving.GetFeastServingInfoResponse")

FIELD_STATUS_NAMES: dict[int, str] = {
    v.number: v.name for v in _pool.FindEnumTypeByName("feast.serving.FieldStatus").values
}
