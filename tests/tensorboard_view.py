"""What ``tensorboard --logdir DIR`` shows first, computed from the event files as TensorBoard 2.x
does: its own data provider and plugins read the runs (sub-runs included), and the Time Series
page's grouping and sorting (in its web app: group by the tag's first part, natural sort of tags,
the first two groups open) is ported here in a few lines."""

from __future__ import annotations

import functools
from pathlib import Path

from tensorboard import context
from tensorboard.backend.event_processing import data_provider, plugin_event_multiplexer
from tensorboard.plugins import base_plugin
from tensorboard.plugins.hparams import api_pb2, backend_context, get_experiment
from tensorboard.plugins.metrics import metrics_plugin

OPEN_GROUPS = 2  # Time Series opens this many groups when a page is first shown


def _special(char: str) -> bool:
    return char == "/" or char.isdigit()


def compare_tags(a: str, b: str) -> int:
    """TensorBoard's tag order (``compareTagNames``): runs of digits by value, "/" and digits before
    any other character, other characters by code (so upper case before lower case, "_" between)."""
    i = j = 0
    while True:
        if i == len(a):
            return 0 if j == len(b) else -1
        if j == len(b):
            return 1
        if a[i].isdigit() and b[j].isdigit():
            i2, j2 = i, j
            while i2 < len(a) and a[i2].isdigit():
                i2 += 1
            while j2 < len(b) and b[j2].isdigit():
                j2 += 1
            x, y = int(a[i:i2]), int(b[j:j2])
            if x != y:
                return -1 if x < y else 1
            i, j = i2, j2
            continue
        if _special(a[i]):
            if not _special(b[j]):
                return -1
        elif _special(b[j]):
            return 1
        elif a[i] != b[j]:
            return -1 if a[i] < b[j] else 1
        i, j = i + 1, j + 1


def _provider(logdir: Path):
    multiplexer = plugin_event_multiplexer.EventMultiplexer()
    multiplexer.AddRunsFromDirectory(str(logdir))
    multiplexer.Reload()
    return data_provider.MultiplexerDataProvider(multiplexer, str(logdir))


def time_series_groups(logdir: Path) -> list[tuple[str, list[str]]]:
    """The Time Series page's groups in order, each with its cards' tags in order (scalars and
    images of every run under ``logdir``); the first :data:`OPEN_GROUPS` are open."""
    plugin = metrics_plugin.MetricsPlugin(base_plugin.TBContext(data_provider=_provider(logdir)))
    tags = plugin._tags_impl(context.RequestContext(), experiment="")
    cards = {tag for kind in ("scalars", "histograms") for run in tags[kind]["runTagInfo"].values() for tag in run}
    cards |= set(tags["images"]["tagRunSampledInfo"])
    groups: dict[str, list[str]] = {}
    for tag in sorted(cards, key=functools.cmp_to_key(compare_tags)):
        groups.setdefault(tag.split("/", 1)[0], []).append(tag)
    return list(groups.items())


def hparams_columns(logdir: Path) -> tuple[list[str], list[str]]:
    """The HPARAMS table's columns shown before any is ticked: (settings, scores), each in order.
    The page shows the first five settings the server sends (those that differ between runs first,
    then by name) and the first five scores (sorted by tag)."""
    tb_context = base_plugin.TBContext(data_provider=_provider(logdir))
    handler = get_experiment.Handler(
        context.RequestContext(), backend_context.Context(tb_context), "", api_pb2.GetExperimentRequest()
    )
    experiment = handler.run()
    settings = [h.name for h in experiment.hparam_infos][:5]
    scores = [m.name.tag if not m.name.group else f"{m.name.group}.{m.name.tag}" for m in experiment.metric_infos]
    return settings, scores[:5]


def hparams_sessions(logdir: Path) -> list[str]:
    """The HPARAMS table's rows: the runs that hold a session (one per training run)."""
    provider = _provider(logdir)
    mapping = provider.list_tensors(context.RequestContext(), experiment_id="", plugin_name="hparams")
    return sorted(run for run, tags in mapping.items() if "_hparams_/session_start_info" in tags)
