"""The client's option objects map onto the request messages' fields, and
what the clients and ``imago generate`` send is built from them."""

from __future__ import annotations

import asyncio
import dataclasses
from concurrent import futures

import grpc
import pytest
from conftest import gradient, png, png_bytes

from imago.client import (
    AsyncImagoClient,
    DiffusionOptions,
    ImageToImage,
    ImagoClient,
    Inpaint,
    OutputOptions,
    PreviewOptions,
    TextOptions,
)
from imago.client.cli import main
from imago.client.messages import (
    GENERATION_FIELDS,
    ask_request,
    caption_request,
    generate_request,
    text_settings,
)
from imago.v1 import (
    caption_pb2,
    caption_pb2_grpc,
    common_pb2,
    imagegen_pb2,
    imagegen_pb2_grpc,
)

PNG = png_bytes()
JPEG = png_bytes(fmt="JPEG")


def default_request(prompt: str = "a fox") -> imagegen_pb2.GenerateRequest:
    """What a request with every option left alone has always carried."""
    return imagegen_pb2.GenerateRequest(
        prompt=prompt,
        num_images=1,
        output_format=common_pb2.IMAGE_FORMAT_PNG,
        previews=imagegen_pb2.PreviewOptions(
            format=common_pb2.IMAGE_FORMAT_JPEG, method=imagegen_pb2.PREVIEW_METHOD_LATENT_RGB
        ),
        text_to_image=imagegen_pb2.TextToImage(),
    )


def image(data: bytes) -> common_pb2.Image:
    mime = {b"\x89P": "image/png", b"\xff\xd8": "image/jpeg"}[data[:2]]
    return common_pb2.Image(data=data, mime_type=mime)


# ------------------------------------------------------------------ generate


def test_defaults_build_the_request_the_flat_keywords_built():
    built = generate_request("a fox")
    assert built == default_request()
    assert built.SerializeToString(deterministic=True) == default_request().SerializeToString(
        deterministic=True
    )


def test_default_option_objects_build_the_same_request_as_none():
    explicit = generate_request(
        "a fox",
        diffusion=DiffusionOptions(),
        previews=PreviewOptions(),
        output=OutputOptions(),
        edit=None,
    )
    assert explicit == default_request()


def test_negative_prompt_is_its_own_field():
    assert generate_request("a fox", negative_prompt="blur").negative_prompt == "blur"


def test_diffusion_options_set_the_top_level_fields():
    options = DiffusionOptions(width=64, height=32, steps=4, num_images=2, scheduler="euler")
    request = generate_request("a fox", diffusion=options)
    expected = default_request()
    expected.MergeFrom(
        imagegen_pb2.GenerateRequest(width=64, height=32, steps=4, num_images=2, scheduler="euler")
    )
    assert request == expected


def test_unset_guidance_and_seed_stay_unset_while_zero_is_sent():
    unset = generate_request("a fox", diffusion=DiffusionOptions())
    assert not unset.HasField("guidance_scale") and not unset.HasField("seed")
    zero = generate_request("a fox", diffusion=DiffusionOptions(guidance_scale=0.0, seed=0))
    assert zero.HasField("guidance_scale") and zero.HasField("seed")
    assert (zero.guidance_scale, zero.seed) == (0.0, 0)


def test_loras_become_weights_in_the_order_named():
    request = generate_request(
        "a fox", diffusion=DiffusionOptions(loras={"ink": 1.0, "chalk": 0.5})
    )
    assert list(request.loras) == [
        imagegen_pb2.LoraWeight(name="ink", weight=1.0),
        imagegen_pb2.LoraWeight(name="chalk", weight=0.5),
    ]


def test_lora_pairs_keep_one_weight_per_name_the_last_one():
    pairs = DiffusionOptions(loras=[("ink", 1.0), ("chalk", 0.5), ("ink", 0.25)])
    assert pairs.loras == (("ink", 0.25), ("chalk", 0.5))
    assert pairs == DiffusionOptions(loras={"ink": 0.25, "chalk": 0.5})
    assert hash(pairs) == hash(DiffusionOptions(loras={"ink": 0.25, "chalk": 0.5}))


def test_preview_options_fill_the_previews_message():
    previews = PreviewOptions(
        every_n_steps=2, format="png", max_size=128, method="taesd", all_images=True
    )
    assert generate_request("a fox", previews=previews).previews == imagegen_pb2.PreviewOptions(
        every_n_steps=2,
        format=common_pb2.IMAGE_FORMAT_PNG,
        max_size=128,
        method=imagegen_pb2.PREVIEW_METHOD_TAESD,
        all_images=True,
    )


def test_an_unknown_preview_method_is_refused_when_the_request_is_built():
    with pytest.raises(ValueError, match="latent_rgb, taesd or full"):
        generate_request("a fox", previews=PreviewOptions(method="vae"))


def test_output_options_set_format_quality_and_omit_parameters():
    output = OutputOptions(format="jpg", quality=40, embed_parameters=False)
    request = generate_request("a fox", output=output)
    assert request.output_format == common_pb2.IMAGE_FORMAT_JPEG
    assert (request.output_quality, request.omit_parameters) == (40, True)
    assert not generate_request("a fox", output=OutputOptions()).omit_parameters


def test_an_unknown_output_format_is_refused_when_the_request_is_built():
    with pytest.raises(ValueError, match="gif"):
        generate_request("a fox", output=OutputOptions(format="gif"))


def test_image_to_image_fills_its_task_with_the_encoded_image():
    request = generate_request("a fox", edit=ImageToImage(PNG, strength=0.5))
    assert request.WhichOneof("task") == "image_to_image"
    assert request.image_to_image == imagegen_pb2.ImageToImage(init_image=image(PNG), strength=0.5)


def test_a_style_image_and_its_scale_go_with_image_to_image():
    edit = ImageToImage(PNG, style_image=JPEG, style_scale=0.8)
    task = generate_request("a fox", edit=edit).image_to_image
    assert task.style_image == image(JPEG)
    assert task.style_scale == pytest.approx(0.8)


def test_image_inputs_may_be_paths_or_pil_images(tmp_path):
    path = tmp_path / "init.png"
    path.write_bytes(PNG)
    from_path = generate_request("a fox", edit=ImageToImage(str(path))).image_to_image
    assert from_path.init_image == image(PNG)
    from_pil = generate_request("a fox", edit=ImageToImage(gradient())).image_to_image
    assert from_pil.init_image == image(png(gradient()))


def test_inpaint_fills_its_task_with_image_mask_and_strength():
    request = generate_request("a door", edit=Inpaint(PNG, JPEG, strength=0.7))
    assert request.WhichOneof("task") == "inpaint"
    assert request.inpaint.image == image(PNG)
    assert request.inpaint.mask == image(JPEG)
    assert request.inpaint.strength == pytest.approx(0.7)


def test_an_edit_of_another_type_is_a_type_error():
    with pytest.raises(TypeError, match="ImageToImage, Inpaint or None"):
        generate_request("a fox", edit=PNG)


def test_option_objects_are_frozen():
    options = DiffusionOptions(steps=4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.steps = 5
    assert dataclasses.replace(options, seed=3) == DiffusionOptions(steps=4, seed=3)


def test_option_fields_are_keywords_only():
    with pytest.raises(TypeError):
        DiffusionOptions(64, 64)


# ------------------------------------------------------------------ text


def test_text_options_name_every_generation_settings_field():
    assert tuple(field.name for field in dataclasses.fields(TextOptions)) == GENERATION_FIELDS


def test_text_options_set_only_the_fields_given():
    settings = text_settings(TextOptions(num_beams=3, do_sample=False, top_k=0))
    assert settings == common_pb2.GenerationSettings(num_beams=3, do_sample=False, top_k=0)
    assert settings.HasField("do_sample") and not settings.HasField("seed")


def test_default_caption_request_carries_empty_settings():
    assert caption_request(PNG) == caption_pb2.CaptionRequest(
        image=image(PNG), generation=common_pb2.GenerationSettings()
    )


def test_ask_request_carries_question_settings_and_adapter():
    request = ask_request(PNG, "why?", generation=TextOptions(seed=4), adapter="ink")
    assert (request.question, request.adapter, request.generation.seed) == ("why?", "ink", 4)


# ------------------------------------------------------------------ what is sent


class Recorder(imagegen_pb2_grpc.ImageGenServiceServicer, caption_pb2_grpc.CaptionServiceServicer):
    """Keeps every request it gets and answers each at once."""

    def __init__(self) -> None:
        self.requests: list = []

    def Generate(self, request, context):
        self.requests.append(request)
        generated = imagegen_pb2.GeneratedImage(image=image(PNG), seed=7)
        yield imagegen_pb2.GenerateResponse(result=imagegen_pb2.Result(images=[generated]))

    def Caption(self, request, context):
        self.requests.append(request)
        return caption_pb2.CaptionResponse()


@pytest.fixture
def recorder():
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    recorder = Recorder()
    imagegen_pb2_grpc.add_ImageGenServiceServicer_to_server(recorder, server)
    caption_pb2_grpc.add_CaptionServiceServicer_to_server(recorder, server)
    port = server.add_insecure_port("127.0.0.1:0")
    server.start()
    recorder.target = f"127.0.0.1:{port}"
    yield recorder
    server.stop(0)


def test_generate_result_sends_the_request_its_options_build(recorder):
    options = dict(
        negative_prompt="blur",
        diffusion=DiffusionOptions(steps=3, seed=5),
        previews=PreviewOptions(every_n_steps=1),
        output=OutputOptions(format="webp"),
        edit=ImageToImage(PNG, strength=0.4),
    )
    with ImagoClient(recorder.target, timeout=10) as client:
        client.generate_result("a fox", **options)
    assert recorder.requests == [generate_request("a fox", **options)]


def test_the_async_client_sends_the_same_request(recorder):
    diffusion = DiffusionOptions(width=64, height=64, loras={"ink": 0.5})

    async def run() -> None:
        async with AsyncImagoClient(recorder.target, timeout=10) as client:
            async for _ in client.generate("a fox", diffusion=diffusion, edit=Inpaint(PNG, JPEG)):
                pass

    asyncio.run(run())
    assert recorder.requests == [
        generate_request("a fox", diffusion=diffusion, edit=Inpaint(PNG, JPEG))
    ]


def test_caption_sends_its_text_options(recorder):
    with ImagoClient(recorder.target, timeout=10) as client:
        client.caption(PNG, prefix="a", generation=TextOptions(max_new_tokens=5))
    assert recorder.requests == [
        caption_pb2.CaptionRequest(
            image=image(PNG), prefix="a", generation=common_pb2.GenerationSettings(max_new_tokens=5)
        )
    ]


def test_imago_generate_without_options_sends_the_default_request(recorder, tmp_path):
    argv = ["--target", recorder.target, "generate", "a fox", "-o", str(tmp_path / "fox.png")]
    assert main(argv) == 0
    assert recorder.requests == [default_request()]


def test_imago_generate_flags_land_in_their_fields(recorder, tmp_path):
    (tmp_path / "init.png").write_bytes(PNG)
    (tmp_path / "style.jpg").write_bytes(JPEG)
    argv = [
        "--target", recorder.target, "generate", "a fox", "-o", str(tmp_path / "fox.jpg"),
        "--negative", "blur", "--width", "64", "--height", "48", "--steps", "5",
        "--guidance", "3.5", "--seed", "7", "--quality", "40", "--no-parameters",
        "--init", str(tmp_path / "init.png"), "--style", str(tmp_path / "style.jpg"),
        "--style-scale", "0.5", "--strength", "0.6", "--scheduler", "lms",
        "--num-images", "1", "--previews", str(tmp_path / "previews"), "--preview-every", "2",
        "--preview-method", "full", "--all-previews", "--lora", "ink", "--lora", "chalk:0.5",
    ]  # fmt: skip
    assert main(argv) == 0
    expected = imagegen_pb2.GenerateRequest(
        prompt="a fox",
        negative_prompt="blur",
        width=64,
        height=48,
        steps=5,
        guidance_scale=3.5,
        seed=7,
        num_images=1,
        output_format=common_pb2.IMAGE_FORMAT_JPEG,
        previews=imagegen_pb2.PreviewOptions(
            every_n_steps=2,
            format=common_pb2.IMAGE_FORMAT_JPEG,
            method=imagegen_pb2.PREVIEW_METHOD_FULL,
            all_images=True,
        ),
        scheduler="lms",
        output_quality=40,
        omit_parameters=True,
        loras=[
            imagegen_pb2.LoraWeight(name="ink", weight=1.0),
            imagegen_pb2.LoraWeight(name="chalk", weight=0.5),
        ],
        image_to_image=imagegen_pb2.ImageToImage(
            init_image=image(PNG), strength=0.6, style_image=image(JPEG), style_scale=0.5
        ),
    )
    assert recorder.requests == [expected]


def test_imago_generate_with_a_mask_sends_an_inpaint_task(recorder, tmp_path):
    (tmp_path / "init.png").write_bytes(PNG)
    (tmp_path / "mask.jpg").write_bytes(JPEG)
    argv = [
        "--target", recorder.target, "generate", "a door", "-o", str(tmp_path / "door.png"),
        "--init", str(tmp_path / "init.png"), "--mask", str(tmp_path / "mask.jpg"),
        "--strength", "0.3",
    ]  # fmt: skip
    assert main(argv) == 0
    (sent,) = recorder.requests
    assert sent.inpaint == imagegen_pb2.Inpaint(image=image(PNG), mask=image(JPEG), strength=0.3)
