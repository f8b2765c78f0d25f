"""``imago serve``: the grpc.aio frontend, its worker pool, health and reflection."""

from __future__ import annotations

import asyncio
import logging
import signal

import grpc
from grpc_health.v1 import health, health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection

from imago.server.config import ServeConfig
from imago.server.dispatch import Dispatcher
from imago.server.pool import StartupError, WorkerPool, detect_devices
from imago.server.scheduler import Scheduler
from imago.server.servicers import (
    SERVICES,
    AlignServicer,
    CaptionServicer,
    ImageGenServicer,
    VqaServicer,
)
from imago.v1 import align_pb2_grpc, caption_pb2_grpc, imagegen_pb2_grpc, vqa_pb2_grpc
from imago.workers.presets import model_for_service

log = logging.getLogger("imago")

SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


class Health:
    """grpc.health.v1 status per service: SERVING while a live worker holds the
    service's model, NOT_SERVING otherwise and while shutting down. The overall
    status ("") is SERVING when every configured service is."""

    def __init__(self, config: ServeConfig) -> None:
        self.servicer = health.aio.HealthServicer()
        self._models = config.models()
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


def build_server(config: ServeConfig) -> tuple[grpc.aio.Server, WorkerPool, Health]:
    """Wire servicers, scheduler and pool together; nothing is started yet."""
    limits = config.limits
    server = grpc.aio.server(
        options=[
            ("grpc.max_receive_message_length", limits.max_message_bytes),
            ("grpc.max_send_message_length", limits.max_message_bytes),
            # A second server on the same port must fail to start, not share it.
            ("grpc.so_reuseport", 0),
        ]
    )
    health_status = Health(config)
    models = config.models()
    policies = {spec.name: spec.batch_policy for spec in models}
    scheduler = Scheduler(limits.max_queue_size, policies)
    devices = detect_devices(config.workers, config.cpu_only)
    pool = WorkerPool(
        models,
        devices,
        scheduler,
        cache_dir=config.cache_dir,
        on_change=health_status.schedule_update,
    )
    health_status.attach(pool)
    dispatcher = Dispatcher(models, scheduler, pool, limits)
    caption_pb2_grpc.add_CaptionServiceServicer_to_server(CaptionServicer(dispatcher), server)
    vqa_pb2_grpc.add_VqaServiceServicer_to_server(VqaServicer(dispatcher), server)
    imagegen_pb2_grpc.add_ImageGenServiceServicer_to_server(ImageGenServicer(dispatcher), server)
    align_pb2_grpc.add_AlignServiceServicer_to_server(AlignServicer(dispatcher), server)
    health_pb2_grpc.add_HealthServicer_to_server(health_status.servicer, server)
    names = (*SERVICES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name)
    reflection.enable_server_reflection((*names, reflection.SERVICE_NAME), server)
    return server, pool, health_status


async def serve(config: ServeConfig) -> int:
    """Serve until SIGINT or SIGTERM; return the process exit code."""
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    server, pool, health_status = build_server(config)
    # SIGHUP re-reads LoRA adapter directories, as daemons re-read their config.
    loop.add_signal_handler(signal.SIGHUP, pool.reload_adapters)
    address = f"{config.host}:{config.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:
        log.error("cannot listen on %s: %s", address, exc)
        await pool.stop()
        return 1
    # Listen at once, NOT_SERVING, so probes can tell "loading" from "down".
    await health_status.update()
    await server.start()
    log.info("listening on %s:%d; loading models (preset %s)", config.host, port, config.preset)
    exit_code = 0
    try:
        loading = asyncio.create_task(pool.start(config.load_timeout_s))
        stopping = asyncio.create_task(stop.wait())
        await asyncio.wait({loading, stopping}, return_when=asyncio.FIRST_COMPLETED)
        if loading.done():
            loading.result()
            await health_status.update()
            log.info("serving on %s:%d", config.host, port)
            await stop.wait()
        else:
            loading.cancel()
        log.info("shutting down")
    except StartupError as exc:
        log.error("start-up failed: %s", exc)
        exit_code = 1
    finally:
        health_status.draining = True
        await health_status.update()
        await server.stop(grace=5)
        await pool.stop()
    return exit_code


def run(config: ServeConfig) -> int:
    """Blocking entry point used by ``imago serve`` (which sets up logging)."""
    return asyncio.run(serve(config))
