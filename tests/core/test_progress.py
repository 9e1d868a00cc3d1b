"""`splice.core.progress`: bars on a terminal, nothing elsewhere or under quiet, one display."""

from __future__ import annotations

import io

import pytest
from rich.console import Console

from splice.core import progress


def terminal() -> Console:
    """A console that says it is a terminal and records what is drawn on it."""
    return Console(file=io.StringIO(), force_terminal=True, record=True, width=120)


def test_a_bar_shows_on_a_terminal_and_the_items_pass_through():
    console = terminal()
    with progress.use(console):
        assert list(progress.track(iter("abc"), "counting", total=3)) == ["a", "b", "c"]
    text = console.export_text()
    assert "counting" in text and "0/3" in text


@pytest.mark.parametrize("options", [{"force_terminal": False}, {"force_terminal": True, "quiet": True}],
                         ids=["not a terminal", "quiet console"])
def test_nothing_is_drawn_off_a_terminal_or_on_a_quiet_console(options):
    console = Console(file=io.StringIO(), record=True, **options)
    with progress.use(console):
        assert list(progress.track(range(3), "counting")) == [0, 1, 2]
    assert console.export_text() == ""


def test_quiet_switch_silences_a_terminal_and_a_nested_use_cannot_undo_it():
    console = terminal()
    with progress.use(console, quiet=True), progress.use(console):
        assert not progress.showing()
        assert sum(progress.track(range(4), "counting")) == 6
    assert console.export_text() == ""
    with progress.use(console):
        assert progress.showing()


def test_disabled_task_draws_nothing_and_its_handle_does_nothing():
    console = terminal()
    with progress.use(console), progress.task("rank 1", total=2, enabled=False) as bar:
        bar.advance()
        bar.update(total=5)
    assert console.export_text() == ""


def test_a_bar_inside_a_display_joins_it_with_the_displays_own_fields():
    console = terminal()
    with progress.use(console), progress.display(details="loss {loss}", transient=False) as bars:
        train = bars.add_task("train", total=2, loss="-")
        assert list(progress.track([1, 2], "evaluate")) == [1, 2]  # no second live display: no LiveError
        with progress.use(quiet=True):
            assert list(progress.track([3], "hushed")) == [3]
        bars.update(train, advance=2, loss="0.5")
    text = console.export_text()
    assert "evaluate" in text and "loss -" in text and "hushed" not in text
    assert text.rindex("2/2 loss 0.5") > text.rindex("evaluate")  # the display's last state: the bar has gone
