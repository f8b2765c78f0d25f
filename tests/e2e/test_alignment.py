"""AlignService through the real server: embeddings, similarity matrices,
image-text matching, its limits, and ``imago rank``."""

from __future__ import annotations

import io
import json
import threading

import grpc
import numpy as np
import pytest
import torch
from conftest import gradient, png, png_bytes, start_server
from PIL import Image
from test_invalid_requests import assert_invalid
from transformers import (
    Blip2ForImageTextRetrieval,
    Blip2Processor,
    Blip2TextModelWithProjection,
    Blip2VisionModelWithProjection,
)

from imago.client.api import ImagoClient
from imago.client.cli import main
from imago.client.messages import matrix_rows
from imago.v1 import align_pb2, align_pb2_grpc, common_pb2
from imago.workers.checkpoints import tiny

RED = png_bytes(size=(40, 36), color=(220, 30, 30))
BLUE = png_bytes(size=(52, 44), color=(20, 40, 210))
RAMP = png(gradient(64, 48))
IMAGES = [RED, BLUE, RAMP]
TEXTS = ["a red square", "a blue sky over the sea", "a dog running on the grass"]


@pytest.fixture(scope="module")
def client(server):
    with ImagoClient(server.target, timeout=120) as c:
        yield c


@pytest.fixture(scope="module")
def direct(model_cache):
    """The tiny retrieval checkpoint, loaded by transformers' own classes."""
    path = tiny.ensure("blip2-itm", model_cache)
    processor = Blip2Processor.from_pretrained(path)
    vision = Blip2VisionModelWithProjection.from_pretrained(path).eval()
    text = Blip2TextModelWithProjection.from_pretrained(path).eval()
    retrieval = Blip2ForImageTextRetrieval.from_pretrained(path).eval()
    return processor, vision, text, retrieval


def rgb(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def image_vectors(reply: align_pb2.EmbedImagesResponse) -> np.ndarray:
    return np.array([[q.values for q in e.queries] for e in reply.embeddings], dtype=np.float32)


def text_vectors(reply: align_pb2.EmbedTextsResponse) -> np.ndarray:
    return np.array([e.values for e in reply.embeddings], dtype=np.float32)


# ------------------------------------------------------------------ embeddings


def test_each_image_embeds_as_unit_vectors_one_per_query(client):
    reply = client.embed_images(IMAGES)
    vectors = image_vectors(reply)
    queries = vectors.shape[1]
    assert vectors.shape == (3, queries, reply.dimensions)
    assert queries > 1 and reply.dimensions > 1
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[1], atol=1e-3)
    assert reply.info.model == "blip2-itm-tiny"


def test_each_text_embeds_as_one_unit_vector(client):
    reply = client.embed_texts(TEXTS)
    vectors = text_vectors(reply)
    assert vectors.shape == (3, reply.dimensions)
    np.testing.assert_allclose(np.linalg.norm(vectors, axis=-1), 1.0, atol=1e-5)
    assert not np.allclose(vectors[0], vectors[2], atol=1e-3)


def test_served_image_embeddings_equal_the_vision_projection_model(client, direct):
    processor, vision, _, _ = direct
    served = image_vectors(client.embed_images(IMAGES))
    inputs = processor(images=[rgb(i) for i in IMAGES], return_tensors="pt")
    with torch.inference_mode():
        expected = vision(pixel_values=inputs["pixel_values"]).image_embeds.numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_served_text_embeddings_equal_the_text_projection_model(client, direct):
    processor, _, text, _ = direct
    served = text_vectors(client.embed_texts(TEXTS))
    inputs = processor.tokenizer(TEXTS, padding=True, return_tensors="pt")
    with torch.inference_mode():
        expected = text(**inputs).text_embeds[:, 0, :].numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


# ------------------------------------------------------------------ Match


def test_similarities_are_the_best_query_dot_product_of_the_embeddings(client):
    reply = client.match(IMAGES, TEXTS)
    assert (reply.similarities.rows, reply.similarities.columns) == (3, 3)
    images = image_vectors(client.embed_images(IMAGES))
    texts = text_vectors(client.embed_texts(TEXTS))
    expected = np.einsum("iqd,td->iqt", images, texts).max(axis=1)
    np.testing.assert_allclose(np.array(matrix_rows(reply.similarities)), expected, atol=1e-5)
    assert not reply.HasField("match_probabilities")


def test_served_similarities_equal_the_retrieval_models_contrastive_scores(client, direct):
    processor, _, _, retrieval = direct
    served = matrix_rows(client.match(IMAGES[:2], TEXTS).similarities)
    inputs = processor(images=[rgb(i) for i in IMAGES[:2]], text=TEXTS, padding=True,
                       return_tensors="pt")  # fmt: skip
    with torch.inference_mode():
        expected = retrieval(**inputs, use_image_text_matching_head=False).logits_per_image
    np.testing.assert_allclose(np.array(served), expected.numpy(), atol=1e-5)


def test_match_probabilities_equal_the_itm_head_on_each_pair(client, direct):
    processor, _, _, retrieval = direct
    reply = client.match(IMAGES[:2], TEXTS, image_text_matching=True)
    served = np.array(matrix_rows(reply.match_probabilities))
    assert served.shape == (2, 3)
    assert ((served >= 0) & (served <= 1)).all()
    pairs = [(i, t) for i in IMAGES[:2] for t in TEXTS]
    inputs = processor(images=[rgb(i) for i, _ in pairs], text=[t for _, t in pairs],
                       padding=True, return_tensors="pt")  # fmt: skip
    with torch.inference_mode():
        logits = retrieval(**inputs, use_image_text_matching_head=True).logits_per_image
    expected = logits.softmax(dim=-1)[:, 1].reshape(2, 3).numpy()
    np.testing.assert_allclose(served, expected, atol=1e-5)


def test_concurrent_alignment_requests_share_a_batch_and_keep_their_results(server, client):
    alone = [text_vectors(client.embed_texts([t])) for t in TEXTS]
    replies: dict[int, align_pb2.EmbedTextsResponse] = {}
    barrier = threading.Barrier(len(TEXTS))

    def embed(index: int) -> None:
        with ImagoClient(server.target, timeout=120) as own:
            barrier.wait()
            replies[index] = own.embed_texts([TEXTS[index]])

    threads = [threading.Thread(target=embed, args=(i,)) for i in range(len(TEXTS))]
    for _ in range(5):  # the three must arrive within one batch window at least once
        replies.clear()
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if max(r.info.batch_size for r in replies.values()) > 1:
            break
        threads = [threading.Thread(target=embed, args=(i,)) for i in range(len(TEXTS))]
    assert max(r.info.batch_size for r in replies.values()) > 1
    for index, reply in replies.items():
        np.testing.assert_allclose(text_vectors(reply), alone[index], atol=1e-5)


# ------------------------------------------------------------------ bad input

Img = common_pb2.Image
GOOD = Img(data=RED)

ALIGN_CASES = {
    "images (none)": ("EmbedImages", align_pb2.EmbedImagesRequest()),
    "images (too many)": ("EmbedImages", align_pb2.EmbedImagesRequest(images=[GOOD] * 33)),
    "images[1].data": (
        "EmbedImages",
        align_pb2.EmbedImagesRequest(images=[GOOD, Img(data=b"not an image")]),
    ),
    # A sound header with a cut-off body: found out when the worker decodes it.
    "images[0].data (truncated)": (
        "EmbedImages",
        align_pb2.EmbedImagesRequest(images=[Img(data=png_bytes(size=(300, 300))[:200])]),
    ),
    "texts (none)": ("EmbedTexts", align_pb2.EmbedTextsRequest()),
    "texts (too many)": ("EmbedTexts", align_pb2.EmbedTextsRequest(texts=["a cat"] * 257)),
    "texts[1]": ("EmbedTexts", align_pb2.EmbedTextsRequest(texts=["a cat", "  "])),
    "texts[0]": ("EmbedTexts", align_pb2.EmbedTextsRequest(texts=["x" * 5000])),
    # Within the server's character limit, past the Q-Former's positions.
    "texts[0] (model limit)": (
        "EmbedTexts",
        align_pb2.EmbedTextsRequest(texts=[" ".join(["dog"] * 600)]),
    ),
    "texts": ("Match", align_pb2.MatchRequest(images=[GOOD])),
    "images": ("Match", align_pb2.MatchRequest(texts=["a cat"])),
    "image_text_matching": (
        "Match",
        align_pb2.MatchRequest(images=[GOOD] * 32, texts=["a cat"] * 33, image_text_matching=True),
    ),
}


@pytest.mark.parametrize("case", ALIGN_CASES)
def test_invalid_alignment_field_is_named(channel, case):
    method, request = ALIGN_CASES[case]
    stub = align_pb2_grpc.AlignServiceStub(channel)
    assert_invalid(getattr(stub, method), request, case.split(" ")[0])


# ------------------------------------------------------------------ imago rank


def rank(server, *args: str, capsys) -> list[str]:
    code = main(["--target", server.target, "--timeout", "120", "rank", *args])
    out = capsys.readouterr().out
    assert code == 0
    return out.splitlines()


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
    folder = tmp_path_factory.mktemp("rank")
    for name, data in zip(("red.png", "blue.png", "ramp.png"), IMAGES, strict=True):
        (folder / name).write_bytes(data)
    return folder


def test_rank_orders_images_by_match_probability(server, client, image_dir, capsys):
    lines = rank(server, str(image_dir), "--prompt", TEXTS[1], capsys=capsys)
    paths = sorted(image_dir.iterdir())
    reply = client.match([p.read_bytes() for p in paths], [TEXTS[1]], image_text_matching=True)
    scores = [row[0] for row in matrix_rows(reply.match_probabilities)]
    best_first = [str(p) for _, p in sorted(zip(scores, paths, strict=True), reverse=True)]
    assert [line.split("\t")[2] for line in lines] == best_first
    assert [line.split("\t")[0] for line in lines] == ["1", "2", "3"]
    printed = [float(line.split("\t")[1]) for line in lines]
    assert printed == pytest.approx(sorted(scores, reverse=True), abs=1e-4)


def test_rank_by_similarity_in_small_groups_prints_the_top_as_json(
    server, client, image_dir, capsys
):
    args = [str(image_dir), "--prompt", TEXTS[0], "--similarity-only", "--group", "2"]
    lines = rank(server, *args, "--top", "2", "--json", capsys=capsys)
    records = [json.loads(line) for line in lines]
    paths = sorted(image_dir.iterdir())
    reply = client.match([p.read_bytes() for p in paths], [TEXTS[0]])
    scores = [row[0] for row in matrix_rows(reply.similarities)]
    expected = sorted(zip(scores, map(str, paths), strict=True), reverse=True)[:2]
    assert [(r["rank"], r["image"]) for r in records] == [(1, expected[0][1]), (2, expected[1][1])]
    assert [r["similarity"] for r in records] == pytest.approx([s for s, _ in expected], abs=1e-5)
    assert all(r["ranked_by"] == "similarity" and r["match_probability"] is None for r in records)


def test_rank_of_a_missing_file_exits_2(server, tmp_path, capsys):
    code = main(["--target", server.target, "rank", str(tmp_path / "gone.png"), "--prompt", "x"])
    assert code == 2
    assert "gone.png" in capsys.readouterr().err


# ------------------------------------------------------------ without an ITM head


@pytest.fixture(scope="module")
def itc_server(model_cache, tmp_path_factory):
    running = start_server(
        model_cache, tmp_path_factory.mktemp("itc"), "--model", "blip2-align=tiny:blip2-itc"
    )
    yield running
    assert running.stop() == 0, running.log()


def test_matching_on_a_model_without_an_itm_head_fails_its_precondition(itc_server):
    with ImagoClient(itc_server.target, timeout=60) as itc:
        assert itc.match([RED], ["a red square"]).similarities.values
        with pytest.raises(grpc.RpcError) as caught:
            itc.match([RED], ["a red square"], image_text_matching=True)
    assert caught.value.code() == grpc.StatusCode.FAILED_PRECONDITION
    assert "image_text_matching" in caught.value.details()


def test_rank_without_an_itm_head_ranks_by_similarity(itc_server, image_dir, capsys):
    lines = rank(itc_server, str(image_dir), "--prompt", TEXTS[0], "--json", capsys=capsys)
    records = [json.loads(line) for line in lines]
    assert len(records) == 3
    assert all(r["ranked_by"] == "similarity" for r in records)
    scores = [r["similarity"] for r in records]
    assert scores == sorted(scores, reverse=True)
