"""A small synchronous client for the feature server, for model services.

Example::

    from serving import FeatureClient

    with FeatureClient("127.0.0.1:6566") as client:
        features = client.get_features(
            {"user_id": [42], "merchant_id": [7]},
            feature_service="fraud_detection_v1",
            request_context={"amount": [12.5], "txn_epoch": [1_764_000_000.0]},
        )
        features["amount_mean_7d"]        # [31.2]
        features.statuses["amount_mean_7d"]  # ["PRESENT"]

It does not import the Feast SDK (see :mod:`serving.protos`), so it loads in well under a
second. Errors come back as featurepipe errors: ``InvalidInput`` (fix the request),
``NotFound`` (unknown feature service or feature), ``BackendUnavailable`` (retried
``retries`` times with backoff, then raised).

Replicas: give several addresses (``["10.0.0.1:6566", "10.0.0.2:6566"]``, or one string
``"10.0.0.1:6566,10.0.0.2:6566"``) or a gRPC name (``"dns:///features.internal:6566"``,
``"ipv4:10.0.0.1:6566,10.0.0.2:6566"``) and the client opens one channel with gRPC's
``round_robin`` policy: a connection to every address, calls spread over those that are
ready. A replica that is down or draining drops out of the rotation, so the retry of an
UNAVAILABLE call is picked from the others (see :func:`channel_target`). One plain
``host:port`` connects as before (gRPC's default ``pick_first``).
"""

from __future__ import annotations

import ipaddress
import socket
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from functools import cached_property
from typing import Any

import grpc

from featurepipe.errors import FeaturepipeError, InvalidInput
from serving import protos
from serving.errors import error_for
from serving.values import from_value, to_value

_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class OnlineFeatures:
    """Feature values by column name (join keys first), with each value's status and time.

    ``features["name"]``, ``"name" in features``, ``len()`` and iteration act on the values
    (``.values``, a ``dict[str, list]``). ``statuses`` holds Feast's field status names
    (PRESENT, NULL_VALUE, NOT_FOUND, OUTSIDE_MAX_AGE) and ``event_timestamps`` the event
    time of each value (None when there is none); both are decoded on first access.
    """

    def __init__(self, response: Any) -> None:
        self._names = list(response.metadata.feature_names.val)
        self._results = response.results
        self.values: dict[str, list[Any]] = {
            name: [from_value(v) for v in vector.values]
            for name, vector in zip(self._names, self._results, strict=True)
        }

    @cached_property
    def statuses(self) -> dict[str, list[str]]:
        names = protos.FIELD_STATUS_NAMES
        return {
            name: [names.get(s, str(s)) for s in vector.statuses]
            for name, vector in zip(self._names, self._results, strict=True)
        }

    @cached_property
    def event_timestamps(self) -> dict[str, list[datetime | None]]:
        return {
            name: [_timestamp(t) for t in vector.event_timestamps]
            for name, vector in zip(self._names, self._results, strict=True)
        }

    def __getitem__(self, name: str) -> list[Any]:
        return self.values[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self.values)

    def __len__(self) -> int:
        return len(self.values)

    def __contains__(self, name: object) -> bool:
        return name in self.values

    def __repr__(self) -> str:
        return f"OnlineFeatures({self.values!r})"

    def to_dict(self) -> dict[str, list[Any]]:
        """The values as a plain dict of lists (a copy)."""
        return {name: list(column) for name, column in self.values.items()}

    def to_pandas(self) -> Any:
        """The values as a pandas DataFrame, one row per entity row (imports pandas)."""
        import pandas as pd

        return pd.DataFrame(self.values)

    def rows(self) -> list[dict[str, Any]]:
        """The values row by row: one dict per entity row."""
        columns = list(self.values.items())
        count = len(columns[0][1]) if columns else 0
        return [{name: column[i] for name, column in columns} for i in range(count)]


def _timestamp(ts: Any) -> datetime | None:
    if not ts.seconds and not ts.nanos:
        return None
    return _EPOCH + timedelta(seconds=ts.seconds, microseconds=ts.nanos // 1000)


def _columns(name: str, data: Mapping[str, Sequence[Any]], target: Any) -> None:
    for column, values in data.items():
        if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__iter__"):
            raise InvalidInput(
                f"{name}[{column!r}] must be a list with one value per row, got "
                f"{type(values).__name__}; e.g. {name}={{{column!r}: [{values!r}]}}"
            )
        target[column].val.extend(to_value(v, protos.Value) for v in values)


def build_request(
    entities: Mapping[str, Sequence[Any]],
    feature_service: str | None = None,
    features: Sequence[str] | None = None,
    request_context: Mapping[str, Sequence[Any]] | None = None,
    full_feature_names: bool = False,
) -> Any:
    """A ``GetOnlineFeaturesRequest`` from Python values (see :meth:`FeatureClient.get_features`)."""
    if (feature_service is None) == (features is None):
        raise InvalidInput(
            "pass exactly one of feature_service='name' or features=['view:feature', ...]"
        )
    if isinstance(features, str):
        raise InvalidInput(f"features must be a list of 'view:feature' refs, got {features!r}")
    request = protos.GetOnlineFeaturesRequest(full_feature_names=full_feature_names)
    if feature_service is not None:
        request.feature_service = feature_service
    else:
        request.features.val.extend(features or [])
    _columns("entities", entities, request.entities)
    _columns("request_context", request_context or {}, request.request_context)
    return request


# gRPC's own name schemes: a target naming one leaves the addresses to gRPC's resolver
_SCHEMES = ("dns:", "ipv4:", "ipv6:", "unix:", "unix-abstract:", "vsock:")
ROUND_ROBIN = ("grpc.lb_policy_name", "round_robin")


@dataclass(frozen=True)
class ChannelTarget:
    """What a client's channel connects to: gRPC's target string and channel options.

    ``display`` names the server(s) in error messages (the addresses as given).
    """

    target: str
    options: tuple[tuple[str, Any], ...]
    display: str


def channel_target(target: str | Sequence[str]) -> ChannelTarget:
    """The channel for one server address, several replicas, or a gRPC name.

    * ``"host:port"`` (one address): as given, no options: gRPC's default ``pick_first``.
    * several ``"host:port"`` (a list, or one comma-separated string): one channel over all
      of them with ``round_robin``. IP addresses become an ``ipv4:``/``ipv6:`` target; host
      names are resolved here, once (gRPC resolves only one name per channel), so give
      replicas that come and go one DNS name instead.
    * a gRPC name (``dns:///features.internal:6566``, ``ipv4:a:p,b:p``, ...): as given, with
      ``round_robin``, so every address the name resolves to takes calls.

    With several addresses the ``:authority``, and so the name a TLS certificate must hold,
    is the first address's (gRPC's own default, the whole list, matches no certificate).
    """
    if isinstance(target, str):
        text = target.strip()
        if text.startswith(("ipv4:", "ipv6:")):  # the first address names them all (TLS)
            first = text.split(":", 1)[1].lstrip("/").split(",")[0]
            return ChannelTarget(text, (ROUND_ROBIN, ("grpc.default_authority", first)), text)
        if text.startswith(_SCHEMES):
            return ChannelTarget(text, (ROUND_ROBIN,), text)
        addresses = [a.strip() for a in text.split(",") if a.strip()]
    else:
        addresses = [str(a).strip() for a in target if str(a).strip()]
    if not addresses:
        raise InvalidInput(f"no server address in target {target!r}; pass 'host:port', a list "
                           "of them, or a gRPC name such as 'dns:///features.internal:6566'")
    display = ",".join(addresses)
    if len(addresses) == 1:
        return ChannelTarget(addresses[0], (), display)
    family, hosts = _resolve(addresses)
    authority = ("grpc.default_authority", addresses[0])
    return ChannelTarget(f"{family}:{','.join(hosts)}", (ROUND_ROBIN, authority), display)


def _resolve(addresses: Sequence[str]) -> tuple[str, list[str]]:
    """``("ipv4" | "ipv6", ["ip:port", ...])`` for ``host:port`` addresses: one family, in
    order, each address once (a name may stand for several)."""
    found: dict[str, list[str]] = {"ipv4": [], "ipv6": []}
    named: list[set[str]] = []  # the families each address resolved to
    for address in addresses:
        host, sep, port = address.rpartition(":")
        host = host.strip("[]")
        if not sep or not host or not port.isdigit():
            raise InvalidInput(f"server address {address!r} is not 'host:port'; e.g. "
                               "'10.0.0.1:6566' or '[::1]:6566'")
        try:
            ips = [ipaddress.ip_address(host)]
        except ValueError:  # a host name
            try:
                infos = socket.getaddrinfo(host, int(port), type=socket.SOCK_STREAM)
            except OSError as exc:
                raise InvalidInput(f"cannot resolve server address {address!r} ({exc}); check "
                                   "the name, or give its IP address") from exc
            ips = [ipaddress.ip_address(str(info[4][0]).split("%")[0]) for info in infos]
        families = set()
        for ip in ips:
            family = f"ipv{ip.version}"
            families.add(family)
            entry = f"[{ip}]:{port}" if ip.version == 6 else f"{ip}:{port}"
            if entry not in found[family]:
                found[family].append(entry)
        named.append(families)
    for family in ("ipv4", "ipv6"):
        if all(family in families for families in named):
            return family, found[family]
    raise InvalidInput(f"server addresses {', '.join(addresses)} mix IPv4 and IPv6 hosts; one "
                       "channel balances over one family: give addresses of one")


def _channel_args(
    root_certificates: bytes | None, token: str | None
) -> tuple[grpc.ChannelCredentials | None, tuple[tuple[str, str], ...]]:
    credentials = (
        grpc.ssl_channel_credentials(root_certificates) if root_certificates is not None else None
    )
    metadata = (("authorization", f"Bearer {token}"),) if token else ()
    return credentials, metadata


class FeatureClient:
    """Fetches online features from a featurepipe (or Feast) gRPC feature server.

    Args:
        target: ``host:port`` of the server; or its replicas: a list of ``host:port``, a
            comma-separated string of them, or a gRPC name such as
            ``dns:///features.internal:6566`` (calls spread round robin: :func:`channel_target`).
        timeout: seconds allowed for each attempt.
        retries: further attempts after an UNAVAILABLE answer, with exponential backoff;
            with replicas each retry is picked from those still ready (another replica
            when the one that failed is down or draining).
        backoff: seconds before the first retry (doubling after each).
        channel: an existing gRPC channel to use instead of opening one (not closed by us).
        root_certificates: PEM CA certificate(s): connect with TLS.
        token: bearer token sent as ``authorization`` metadata.
    """

    def __init__(
        self,
        target: str | Sequence[str],
        timeout: float = 1.0,
        retries: int = 2,
        backoff: float = 0.05,
        channel: grpc.Channel | None = None,
        root_certificates: bytes | None = None,
        token: str | None = None,
    ) -> None:
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        self._own_channel = channel is None
        credentials, self._metadata = _channel_args(root_certificates, token)
        if channel is None:
            where = channel_target(target)
            options = list(where.options)
            channel = (grpc.secure_channel(where.target, credentials, options=options)
                       if credentials is not None
                       else grpc.insecure_channel(where.target, options=options))
            self.target = where.display
        else:
            self.target = target if isinstance(target, str) else ",".join(target)
        self._channel = channel
        self._get_online_features = self._channel.unary_unary(
            protos.GET_ONLINE_FEATURES,
            request_serializer=protos.GetOnlineFeaturesRequest.SerializeToString,
            response_deserializer=protos.GetOnlineFeaturesResponse.FromString,
        )
        self._get_info = self._channel.unary_unary(
            protos.GET_FEAST_SERVING_INFO,
            request_serializer=protos.GetFeastServingInfoRequest.SerializeToString,
            response_deserializer=protos.GetFeastServingInfoResponse.FromString,
        )

    def get_features(
        self,
        entities: Mapping[str, Sequence[Any]],
        feature_service: str | None = None,
        features: Sequence[str] | None = None,
        request_context: Mapping[str, Sequence[Any]] | None = None,
        full_feature_names: bool = False,
    ) -> OnlineFeatures:
        """Feature values for the entity rows in ``entities`` (join key -> list of values).

        Name either a ``feature_service`` or ``features`` (``"view:feature"`` refs).
        ``request_context`` carries the request fields on-demand features need.
        """
        request = build_request(
            entities, feature_service, features, request_context, full_feature_names
        )
        return OnlineFeatures(self._call(self._get_online_features, request))

    def server_version(self) -> str:
        """The Feast version the server reports (GetFeastServingInfo)."""
        return str(self._call(self._get_info, protos.GetFeastServingInfoRequest()).version)

    def _call(self, method: Any, request: Any) -> Any:
        # The retries are this loop's, not a service-config retryPolicy: each attempt has the
        # whole timeout, the error counts the attempts, and one address behaves as before.
        # Each attempt is a new round_robin pick (the next ready replica; one that is down
        # has left the rotation). gRPC's transparent retries, on by default, already resend
        # a call that never reached a server (one refused by a replica draining on SIGTERM).
        attempt = 0
        while True:
            try:
                return method(request, timeout=self.timeout, metadata=self._metadata)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                details = exc.details() if hasattr(exc, "details") else None
                if details is None:  # no details() (not a grpc.Call), or a status sent without details
                    details = str(exc)
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    time.sleep(self.backoff * 2**attempt)
                    attempt += 1
                    continue
                raise _error(self.target, self.timeout, code, details, attempt) from None

    def close(self) -> None:
        """Close the channel (if this client opened it)."""
        if self._own_channel:
            self._channel.close()

    def __enter__(self) -> FeatureClient:
        return self

    def __exit__(self, *exc_info: Any) -> None:
        self.close()


def _error(
    target: str, timeout: float, code: grpc.StatusCode, details: str, retried: int
) -> FeaturepipeError:
    who = f"feature servers {target}" if "," in target else f"feature server {target}"
    if code == grpc.StatusCode.UNAVAILABLE:
        details = f"{who} unavailable after {retried + 1} attempt(s): {details}"
    elif code == grpc.StatusCode.DEADLINE_EXCEEDED:
        details = f"{who} did not answer within {timeout}s; raise timeout= or check the server"
    return error_for(code, details)


class AsyncFeatureClient:
    """The asyncio twin of :class:`FeatureClient` (``grpc.aio``), same arguments::

        async with AsyncFeatureClient("127.0.0.1:6566") as client:
            features = await client.get_features({"user_id": [42]}, feature_service="...")
    """

    def __init__(
        self,
        target: str | Sequence[str],
        timeout: float = 1.0,
        retries: int = 2,
        backoff: float = 0.05,
        root_certificates: bytes | None = None,
        token: str | None = None,
    ) -> None:
        from grpc import aio

        where = channel_target(target)
        self.target = where.display
        self.timeout = timeout
        self.retries = retries
        self.backoff = backoff
        credentials, self._metadata = _channel_args(root_certificates, token)
        options = list(where.options)
        self._channel = (aio.secure_channel(where.target, credentials, options=options)
                         if credentials is not None
                         else aio.insecure_channel(where.target, options=options))
        self._get_online_features = self._channel.unary_unary(
            protos.GET_ONLINE_FEATURES,
            request_serializer=protos.GetOnlineFeaturesRequest.SerializeToString,
            response_deserializer=protos.GetOnlineFeaturesResponse.FromString,
        )

    async def get_features(
        self,
        entities: Mapping[str, Sequence[Any]],
        feature_service: str | None = None,
        features: Sequence[str] | None = None,
        request_context: Mapping[str, Sequence[Any]] | None = None,
        full_feature_names: bool = False,
    ) -> OnlineFeatures:
        """See :meth:`FeatureClient.get_features`."""
        import asyncio

        request = build_request(
            entities, feature_service, features, request_context, full_feature_names
        )
        attempt = 0
        while True:
            try:
                response = await self._get_online_features(
                    request, timeout=self.timeout, metadata=self._metadata
                )
                return OnlineFeatures(response)
            except grpc.RpcError as exc:
                code = exc.code() if hasattr(exc, "code") else grpc.StatusCode.UNKNOWN
                details = exc.details() if hasattr(exc, "details") else None
                if details is None:  # no details() (not a grpc.Call), or a status sent without details
                    details = str(exc)
                if code == grpc.StatusCode.UNAVAILABLE and attempt < self.retries:
                    await asyncio.sleep(self.backoff * 2**attempt)
                    attempt += 1
                    continue
                raise _error(self.target, self.timeout, code, details, attempt) from None

    async def close(self) -> None:
        await self._channel.close()

    async def __aenter__(self) -> AsyncFeatureClient:
        return self

    async def __aexit__(self, *exc_info: Any) -> None:
        await self.close()
