"""The family registry: every entry names code that exists and services the
API has, every preset stands on registered families, and the tables that
read the registry (presets, device options, the runner lookup) follow an
entry added to it."""

from __future__ import annotations

import importlib
import pkgutil
from dataclasses import fields, replace

import pytest

import imago.v1
from imago.server.config import resolve_pixel_limits
from imago.workers.checkpoints import arch, tiny
from imago.workers.contract.families import (
    FAMILIES,
    IMAGE_SERVICE,
    STABLE_DIFFUSION,
    BatchPolicy,
    ExtraRole,
    FamilyInfo,
    arch_builders,
    family,
    import_object,
    role_owner,
    tiny_builders,
)
from imago.workers.contract.presets import (
    FAMILY_BATCHING,
    PRESETS,
    DeviceSettings,
    ModelSpec,
    model_for_service,
    with_overrides,
)
from imago.workers.contract.settings import SettingEntries, with_device_settings
from imago.workers.runtime.registry import load_runner_class
from imago.workers.runtime.runner import Runner

NAMES = sorted(FAMILIES)
TINY_KINDS = sorted(tiny_builders())
ARCH_KINDS = sorted(arch_builders())


def api_services() -> set[str]:
    """Full names of every service the imago.v1 protos declare."""
    names = set()
    for module in pkgutil.iter_modules(imago.v1.__path__):
        if module.name.endswith("_pb2"):
            descriptor = importlib.import_module(f"imago.v1.{module.name}").DESCRIPTOR
            names.update(service.full_name for service in descriptor.services_by_name.values())
    return names


@pytest.mark.parametrize("name", NAMES)
def test_each_family_is_registered_under_its_own_name(name):
    assert FAMILIES[name].name == name
    assert family(name) is FAMILIES[name]


@pytest.mark.parametrize("name", NAMES)
def test_each_familys_runner_imports_and_is_the_runner_of_that_family(name):
    runner_class = load_runner_class(name)
    assert issubclass(runner_class, Runner)
    assert runner_class.family == name
    assert runner_class is import_object(FAMILIES[name].runner)


@pytest.mark.parametrize("name", NAMES)
def test_each_familys_services_are_in_the_protos(name):
    services = FAMILIES[name].services
    assert services
    assert set(services) <= api_services()


def test_no_service_is_answered_by_two_families():
    services = [service for info in FAMILIES.values() for service in info.services]
    assert len(services) == len(set(services))


@pytest.mark.parametrize("name", NAMES)
def test_each_familys_batch_policy_and_device_options_are_valid(name):
    info = FAMILIES[name]
    assert info.batching.max_batch_size >= 1
    assert info.batching.max_batch_delay_ms >= 0
    assert FAMILY_BATCHING[name] == info.batching
    settings = {field.name for field in fields(DeviceSettings)}
    assert set(info.device_options) <= settings


@pytest.mark.parametrize("kind", TINY_KINDS)
def test_each_tiny_builder_imports_and_builds_a_checkpoint(kind, tmp_path):
    assert callable(import_object(tiny_builders()[kind]))
    built = tiny.ensure(kind, tmp_path)
    assert (built / ".complete").exists()
    assert any(path.name != ".complete" for path in built.iterdir())


@pytest.mark.parametrize("kind", ARCH_KINDS)
def test_each_arch_builder_imports(kind):
    assert callable(import_object(arch_builders()[kind]))


def test_tiny_and_arch_kinds_belong_to_one_family_each():
    for attribute in ("tiny_builders", "arch_builders"):
        kinds = [kind for info in FAMILIES.values() for kind in getattr(info, attribute)]
        assert len(kinds) == len(set(kinds)), attribute


def test_a_roles_name_is_neither_a_family_nor_another_familys_role():
    # "NAME=SOURCE" overrides tell roles from families by the name alone.
    roles = [role.name for info in FAMILIES.values() for role in info.roles]
    assert len(roles) == len(set(roles))
    assert not set(roles) & set(FAMILIES)


@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_every_preset_model_is_of_a_registered_family_and_its_roles_are_that_familys(
    preset_name,
):
    for spec in PRESETS[preset_name]:
        info = family(spec.family)
        for role, source in spec.extras:
            assert info.role(role) is not None, (spec.name, role)
            assert role_owner(role) is info
            assert source.startswith(("tiny:", "arch:")) or "/" in source


@pytest.mark.parametrize("preset_name", sorted(PRESETS))
def test_every_tiny_and_arch_source_of_a_preset_has_a_builder(preset_name):
    sources = [
        source
        for spec in PRESETS[preset_name]
        for source in (spec.source, *(extra for _, extra in spec.extras))
    ]
    for source in sources:
        if source.startswith("tiny:"):
            assert source.removeprefix("tiny:") in tiny_builders()
        if arch.is_arch(source):
            assert source.removeprefix(arch.PREFIX) in arch_builders()


def test_an_unknown_family_is_refused_with_the_known_ones():
    with pytest.raises(ValueError, match="unknown model family 'clip'; known families: blip2, "):
        family("clip")
    with pytest.raises(ValueError, match="unknown model family 'clip'"):
        load_runner_class("clip")


def test_a_registry_entry_naming_another_familys_runner_is_refused(monkeypatch):
    wrong = replace(FAMILIES[STABLE_DIFFUSION], name="sd-copy")
    monkeypatch.setitem(FAMILIES, "sd-copy", wrong)
    with pytest.raises(TypeError, match="runner of 'stable-diffusion', not 'sd-copy'"):
        load_runner_class("sd-copy")


def test_a_malformed_import_path_is_refused():
    with pytest.raises(ValueError, match="is not MODULE:ATTRIBUTE"):
        import_object("imago.workers.checkpoints.arch.build")


def test_the_registry_views_are_read_only():
    with pytest.raises(TypeError):
        FAMILIES[STABLE_DIFFUSION].tiny_builders["extra"] = "x:y"  # type: ignore[index]


def test_a_new_registry_entry_is_all_the_contract_tables_need(monkeypatch):
    toy = FamilyInfo(
        name="toy",
        title="Toy",
        services=("imago.v1.ToyService",),
        batching=BatchPolicy(max_batch_size=3, max_batch_delay_ms=5.0),
        runner="toy.runner:ToyRunner",
        roles=(ExtraRole("styles", "a folder of styles", changes_compiled_model=True),),
        device_options=("dtype", "attention", "compile"),
    )
    monkeypatch.setitem(FAMILIES, "toy", toy)

    (spec,) = with_overrides((), ("toy=/models/toy-1/", "styles=/srv/styles"))
    assert (spec.name, spec.family, spec.extras) == ("toy-1", "toy", (("styles", "/srv/styles"),))
    assert spec.batch_policy == BatchPolicy(3, 5.0)
    assert model_for_service((spec,), "imago.v1.ToyService") == spec

    plain = ModelSpec("toy-2", "toy", "/models/toy-2")
    (tuned,) = with_device_settings((plain,), SettingEntries(dtype=("bf16",), compile=("default",)))
    assert (tuned.settings.dtype, tuned.settings.compile) == ("bf16", "default")
    with pytest.raises(ValueError, match="--vae-tiling applies to stable-diffusion models only"):
        with_device_settings((plain,), SettingEntries(vae_tiling=("toy-2=on",)))
    with pytest.raises(ValueError, match="--compile: toy-1 also serves styles"):
        with_device_settings((spec,), SettingEntries(compile=("default",)))


def test_a_family_answering_the_image_service_gets_pixel_limits(monkeypatch):
    painter = FamilyInfo(
        name="painter",
        title="Painter",
        services=(IMAGE_SERVICE,),
        batching=BatchPolicy(max_batch_size=2, max_batch_delay_ms=5.0),
        runner="painter.runner:PainterRunner",
    )
    monkeypatch.setitem(FAMILIES, "painter", painter)
    models = (
        ModelSpec("painter-1", "painter", "/models/painter-1"),
        ModelSpec("blip2-1", "blip2", "/models/blip2-1"),
    )

    assert resolve_pixel_limits(("painter-1=8192",), models, default=4096) == {"painter-1": 8192}
    with pytest.raises(ValueError, match="blip2-1"):
        resolve_pixel_limits(("blip2-1=8192",), models, default=4096)
