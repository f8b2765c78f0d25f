"""Fair queuing: between the flows of one model's queue, and between models."""

from __future__ import annotations

from imago.server.fairness import FairQueue, ModelShares


def drain(queue: FairQueue, batch: int = 1) -> list:
    """Everything in ``queue``, in the order it is served ``batch`` at a time."""
    served = []
    while len(queue):
        taken = list(queue)[:batch]
        queue.take(taken)
        served += taken
    return served


def test_one_flow_is_served_in_arrival_order():
    queue = FairQueue()
    for name in "abcd":
        queue.push(name, "client", 1.0)
    assert drain(queue) == list("abcd")


def test_requests_of_separate_flows_with_equal_tags_keep_arrival_order():
    queue = FairQueue()
    for name in "abcd":
        queue.push(name, name, 1.0)
    assert drain(queue) == list("abcd")


def test_a_single_request_of_a_new_flow_goes_before_a_bulk_flows_backlog():
    queue = FairQueue()
    for index in range(50):
        queue.push(f"bulk-{index}", "bulk", 1.0)
    queue.take(list(queue)[:10])
    queue.push("single", "interactive", 1.0)
    assert list(queue)[0] == "single"


def test_two_backlogged_flows_alternate():
    queue = FairQueue()
    for index in range(3):
        queue.push(f"a{index}", "a", 1.0)
    for index in range(3):
        queue.push(f"b{index}", "b", 1.0)
    assert drain(queue) == ["a0", "b0", "a1", "b1", "a2", "b2"]


def test_a_flow_pays_for_heavier_requests_with_later_turns():
    queue = FairQueue()
    for index in range(2):
        queue.push(f"heavy{index}", "heavy", 4.0)
    for index in range(6):
        queue.push(f"light{index}", "light", 1.0)
    order = drain(queue)
    # heavy1 starts at virtual time 4: the light flow's first four go first.
    assert order.index("heavy1") > order.index("light3")


def test_an_idle_flow_banks_no_credit():
    queue = FairQueue()
    queue.push("early", "quiet", 1.0)
    drain(queue)
    for index in range(20):
        queue.push(f"busy{index}", "busy", 1.0)
    queue.take(list(queue)[:10])
    queue.push("back", "quiet", 1.0)
    queue.push("again", "quiet", 1.0)
    order = list(queue)
    # It re-enters at the current virtual time: one turn, then it alternates.
    assert order[:4] == ["back", "busy10", "again", "busy11"]


def test_removing_a_queued_item_leaves_the_others_in_order():
    queue = FairQueue()
    for name in "abc":
        queue.push(name, "client", 1.0)
    assert queue.remove("b") and not queue.remove("b")
    assert list(queue) == ["a", "c"] and "b" not in queue and "a" in queue


def test_flows_are_forgotten_once_the_queue_is_empty():
    queue = FairQueue()
    for index in range(100):
        queue.push(index, f"flow-{index}", 1.0)
    drain(queue, batch=10)
    assert queue._finish == {}


def test_flows_that_came_and_went_during_a_backlog_stay_bounded():
    queue = FairQueue()
    for index in range(10):
        queue.push(f"bulk-{index}", "bulk", 1.0)
    for index in range(1000):
        queue.push(f"single-{index}", f"flow-{index}", 1.0)
        queue.take([f"single-{index}"])
    assert len(queue) == 10
    assert len(queue._finish) <= 4 * len(queue) + 1


def test_a_model_that_became_backlogged_goes_before_a_busy_models_next_batch():
    shares = ModelShares()
    shares.backlogged("sd")
    for _ in range(5):
        shares.charge("sd", 2.0)
    shares.backlogged("blip2")
    assert shares.tag("blip2") < shares.tag("sd")


def test_backlogged_models_share_time_by_weight():
    shares = ModelShares({"sd": 3.0})
    shares.backlogged("sd")
    shares.backlogged("blip2")
    seconds = {"sd": 0.0, "blip2": 0.0}
    for _ in range(400):
        model = min(("sd", "blip2"), key=shares.tag)
        cost = 0.5 if model == "sd" else 0.05
        shares.charge(model, cost)
        seconds[model] += cost
    assert 2.7 < seconds["sd"] / seconds["blip2"] < 3.3


def test_a_correction_moves_a_models_next_turn_by_the_difference():
    shares = ModelShares({"sd": 2.0})
    shares.backlogged("sd")
    shares.charge("sd", 1.0)
    before = shares.tag("sd")
    shares.correct("sd", 3.0)
    assert shares.tag("sd") == before + 1.5
