"""``imago serve``: the grpc.aio frontend, its worker pool, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc

from imago.server import reflection
from imago.server.admission import Admission, ModelLimits
from imago.server.config import ResolvedConfig
from imago.server.costs import StepTimes
from imago.server.dispatch import Dispatcher
from imago.server.drain import drain
from imago.server.metrics import Metrics, start_http
from imago.server.observability import ObservabilityInterceptor
from imago.server.pool import StartupError, WorkerPool
from imago.server.scheduler import Scheduler
from imago.server.security import (
    SecurityConfigError,
    auth_interceptors,
    server_credentials,
    transport_name,
)
from imago.server.servicers import (
    SERVICES,
    AlignServicer,
    CaptionServicer,
    ImageGenServicer,
    VqaServicer,
)
from imago.v1 import align_pb2_grpc, caption_pb2_grpc, imagegen_pb2_grpc, vqa_pb2_grpc
from imago.workers.contract.presets import model_for_service

log = logging.getLogger("imago")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """grpc.health.v1 status per service: SERVING while a live worker holds the
    service's model, NOT_SERVING otherwise and while shutting down. The overall
    status ("") is SERVING when every configured service is."""

    def __init__(self, config: ResolvedConfig) -> None:
        self.servicer = health.aio.HealthServicer()
        self._models = config.models
        self._pool: WorkerPool | None = None
        self._updates: set[asyncio.Task] = set()
        self.draining = False

    def attach(self, pool: WorkerPool) -> None:
        self._pool = pool

    def schedule_update(self) -> None:
        """Update from synchronous code; the task is kept until it is done."""
        task = asyncio.ensure_future(self.update())
        self._updates.add(task)
        task.add_done_callback(self._updates.discard)

    async def update(self) -> None:
        live = self._pool.live_models() if self._pool and not self.draining else set()
        configured = []
        for service in SERVICES:
            spec = model_for_service(self._models, service)
            if spec is None:
                continue
            configured.append(spec.name in live)
            await self.servicer.set(service, SERVING if spec.name in live else NOT_SERVING)
        overall = SERVING if configured and all(configured) else NOT_SERVING
        await self.servicer.set("", overall)


def build_server(
    config: ResolvedConfig, metrics: Metrics | None = None
) -> tuple[grpc.aio.Server, WorkerPool, Health]:
    """Wire servicers, scheduler and pool together, recording into ``metrics``
    (a registry of their own without); nothing is started yet."""
    given = config.given
    limits = given.limits
    # One list for every interceptor, outermost first. Authentication comes
    # first so that a call without the right token is refused before anything
    # else spends work on it; interceptors after it (metrics, request ids)
    # never see refused calls, which the refusal logs instead.
    # (Refusals answer any method path a client makes up; counting them would
    # let anyone without a token add label values to the metrics at will.)
    if metrics is None:
        metrics = Metrics()
    interceptors: list[grpc.aio.ServerInterceptor] = [
        *auth_interceptors(given),
        ObservabilityInterceptor(metrics),
    ]
    options = [
        ("grpc.max_receive_message_length", limits.max_message_bytes),
        ("grpc.max_send_message_length", limits.max_message_bytes),
        # A second server on the same port must fail to start, not share it.
        ("grpc.so_reuseport", 0),
    ]
    if given.max_connection_age_s is not None:
        # The grace stays unlimited: calls running on an aged connection finish.
        options.append(("grpc.max_connection_age_ms", round(given.max_connection_age_s * 1000)))
    server = grpc.aio.server(interceptors=interceptors, options=options)
    health_status = Health(config)
    models = config.models
    policies = {spec.name: spec.batch_policy for spec in models}
    pixels, watchdogs = config.pixel_limits, config.watchdogs
    admission = Admission(
        {
            spec.name: ModelLimits(pixels.get(spec.name), watchdogs.get(spec.name))
            for spec in models
        },
        StepTimes(),
    )
    scheduler = Scheduler(
        limits.max_queue_size,
        policies,
        metrics=metrics,
        admission=admission,
        weights=dict(config.weights),
    )
    pool = WorkerPool(config, scheduler, on_change=health_status.schedule_update, metrics=metrics)
    health_status.attach(pool)
    dispatcher = Dispatcher(models, scheduler, pool, limits)
    caption_pb2_grpc.add_CaptionServiceServicer_to_server(CaptionServicer(dispatcher), server)
    vqa_pb2_grpc.add_VqaServiceServicer_to_server(VqaServicer(dispatcher), server)
    imagegen_pb2_grpc.add_ImageGenServiceServicer_to_server(ImageGenServicer(dispatcher), server)
    align_pb2_grpc.add_AlignServiceServicer_to_server(AlignServicer(dispatcher), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_status.servicer, server)
    names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable(names, server)
    return server, pool, health_status


async def serve(config: ResolvedConfig) -> int:
    """Serve until SIGINT or SIGTERM; return the process exit code."""
    given = config.given
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    try:
        credentials = server_credentials(given)
        metrics = Metrics()
        server, pool, health_status = build_server(config, metrics)
    except SecurityConfigError as exc:
        log.error("cannot start: %s", exc)
        return 2
    # SIGHUP re-reads LoRA adapter directories, as daemons re-read their config.
    loop.add_signal_handler(signal.SIGHUP, pool.reload_adapters)
    address = f"{given.host}:{given.port}"
    try:
        if credentials is None:
            port = server.add_insecure_port(address)
        else:
            port = server.add_secure_port(address, credentials)
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", address, exc)
        await pool.stop()
        return 1
    if given.metrics_port is not None:
        # Up before the models load, so that scrapes see the workers come up.
        try:
            metrics_port = start_http(metrics, given.host, given.metrics_port)
        except OSError as exc:
            log.error("cannot serve metrics on %s:%d: %s", given.host, given.metrics_port, exc)
            await pool.stop()
            return 1
        log.info("metrics on http://%s:%d/metrics", given.host, metrics_port)
    # Listen at once, NOT_SERVING, so probes can tell "loading" from "down".
    await health_status.update()
    await server.start()
    log.info(
        "listening on %s:%d (%s%s); loading models (preset %s)",
        given.host,
        port,
        transport_name(given),
        ", bearer token" if given.auth_token_file is not None else "",
        given.preset,
    )
    exit_code = 0
    try:
        loading = asyncio.create_task(pool.start(given.load_timeout_s))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()
            await health_status.update()
            log.info("serving on %s:%d", given.host, port)
            await stop.wait()
        else:
            loading.cancel()
        log.info("shutting down")
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        exit_code = 1
    finally:
        health_status.draining = True
        # Refuses new calls, then says NOT_SERVING; running and queued requests may finish.
        await drain(server, pool, given.drain_grace_s, announce=health_status.update)
        await pool.stop()
    return exit_code


def run(config: ResolvedConfig) -> int:
    """Blocking entry point used by ``imago serve`` (which sets up logging)."""
    return asyncio.run(serve(config))
