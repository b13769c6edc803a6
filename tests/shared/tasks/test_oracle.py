"""A user's own oracle, in a module LlamaDuo has never seen, works through the public interface."""

import sys
import textwrap

import pytest

from llamaduo.contracts.events import JudgeItem
from llamaduo.contracts.spec import JudgeSpec, ProviderSpec, TaskSpec
from llamaduo.providers.base import make_provider
from llamaduo.services.judge.domain import judge_items
from llamaduo.tasks.oracle import OracleError, load_oracle

USER_MODULE = '''
class Upper:
    name = "shout"

    def propose(self, seeds, n, seed):
        return [f"shout word {seed}-{i}" for i in range(n)]

    def answer(self, instruction):
        return instruction.upper()
'''


@pytest.fixture
def user_module(tmp_path, monkeypatch):
    (tmp_path / "their_module.py").write_text(textwrap.dedent(USER_MODULE))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setenv("LLAMADUO_ALLOWED_PLUGINS", "their_module,no_such_module_xyz,json:dumps")
    yield "their_module"
    sys.modules.pop("their_module", None)


async def test_user_oracle_class_judges_through_simulated_provider(user_module):
    oracle = load_oracle(f"{user_module}:Upper")
    assert oracle.answer("hi") == "HI"
    provider = make_provider(ProviderSpec(), TaskSpec(name="shout", oracle=f"{user_module}:Upper"))
    assert provider.simulated and "shout" in provider.name
    items = [JudgeItem(item_id="1", instruction="hi there", reference="HI THERE", candidate="HI THERE"),
             JudgeItem(item_id="2", instruction="hi there", reference="HI THERE", candidate="bye")]
    scores, usage = await judge_items(items, provider, JudgeSpec())
    assert scores[0].similarity == 100 and scores[1].similarity < 50
    assert usage.simulated and usage.cost == 0


def test_unusable_oracles_are_refused_with_the_reason(user_module):
    with pytest.raises(OracleError, match="cannot import module"):
        load_oracle("no_such_module_xyz:oracle")
    with pytest.raises(OracleError, match="has no attribute 'nope'"):
        load_oracle(f"{user_module}:nope")
    with pytest.raises(OracleError, match=r"no propose|no arguments"):
        load_oracle("json:dumps")
