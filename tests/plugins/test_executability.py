"""The executability check the CI plugin and the trainer's sandbox share
(kaizen_client.executability): parse, imports, attribute chains and call signatures."""

from __future__ import annotations

import json
import subprocess
import sys
import textwrap
from pathlib import Path

from kaizen_client.executability import Executability, check_source, run_source


def check(source: str) -> Executability:
    return check_source(textwrap.dedent(source))


def test_good_api_use_is_executable() -> None:
    result = check(
        """
        import json
        import os.path
        from collections import OrderedDict as OD
        from pathlib import Path

        def f(a):
            return os.path.join(a, "b"), json.dumps({"k": 1}, indent=2), OD(), Path(a).name
        """
    )
    assert result == Executability(parses=True, imports=True, api=True, runs=None, problems=[])
    assert result.executable


def test_syntax_error_is_not_executable_and_nothing_else_is_checked() -> None:
    result = check("def f(:\n    return 1\n")
    assert (result.parses, result.imports, result.api, result.executable) == (
        False,
        None,
        None,
        False,
    )
    assert result.problems[0].startswith("SyntaxError")


def test_missing_module_and_missing_name_fail_imports() -> None:
    result = check("import kaizen_no_such_module_xyz\nfrom os import no_such_name_xyz\n")
    assert result.imports is False and not result.executable
    assert any("kaizen_no_such_module_xyz" in p for p in result.problems)
    assert any("no_such_name_xyz" in p for p in result.problems)


def test_an_import_guarded_by_import_error_is_optional() -> None:
    result = check(
        """
        try:
            import kaizen_no_such_module_xyz as fast
        except ImportError:
            fast = None
        """
    )
    assert result.imports is True and result.executable


def test_missing_attribute_on_a_module_fails_api() -> None:
    result = check("import os\nos.path.joinn('a', 'b')\n")
    assert result.imports is True and result.api is False
    assert result.problems == ["os.path has no attribute 'joinn'"]


def test_missing_attribute_read_without_a_call_fails_api() -> None:
    result = check("import math\nx = math.tau + math.taux\n")
    assert result.api is False
    assert result.problems == ["math has no attribute 'taux'"]


def test_call_that_does_not_bind_fails_api() -> None:
    too_many = check("import math\nmath.sqrt(1, 2)\n")
    missing = check("import os\nos.path.join()\n")
    bad_keyword = check("import os\nos.path.basename('x', sep='/')\n")
    for result in (too_many, missing, bad_keyword):
        assert result.api is False, result
    assert "too many positional arguments" in too_many.problems[0]
    assert "missing a required argument" in missing.problems[0]
    assert "unexpected keyword argument 'sep'" in bad_keyword.problems[0]


def test_from_import_and_class_constructor_signatures_are_checked() -> None:
    good = check("from fractions import Fraction\nFraction(1, 2)\n")
    bad = check("from fractions import Fraction\nFraction(1, 2, 3, 4)\n")
    assert good.api is True
    assert bad.api is False


def test_starred_arguments_are_not_judged() -> None:
    assert check("import os\nargs = ()\nos.path.join(*args)\n").api is True


def test_a_rebound_name_is_not_taken_for_the_module() -> None:
    # `path` is rebound: its attributes are the program's business, not os.path's.
    result = check("from os import path\npath = {'joinn': 1}\npath.joinn\n")
    assert result.api is True


def test_instance_attributes_are_not_judged() -> None:
    # An attribute of a call's result may be set at run time: only modules and classes count.
    assert check("import types\ntypes.SimpleNamespace().anything\n").api is True


def test_run_source_runs_the_file(tmp_path: Path) -> None:
    good = tmp_path / "good.py"
    good.write_text("import math\nprint(math.sqrt(4))\n")
    crash = tmp_path / "crash.py"
    crash.write_text("x = {}\nx['missing']\n")
    assert run_source(str(good)).runs is True
    result = run_source(str(crash))
    assert result.runs is False and not result.executable
    assert "KeyError" in result.problems[-1]


def test_command_line_prints_the_result_last(tmp_path: Path) -> None:
    program = tmp_path / "p.py"
    program.write_text("import math\nmath.sqroot(2)\n")
    import kaizen_client.executability as module

    out = subprocess.run(
        [sys.executable, module.__file__, str(program)],
        capture_output=True,
        text=True,
        check=True,
    ).stdout
    result = Executability.from_json(json.loads(out.strip().splitlines()[-1]))
    assert result.api is False and result.problems == ["math has no attribute 'sqroot'"]
