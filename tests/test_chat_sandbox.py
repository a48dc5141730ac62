"""Hostile chat templates: every escape attempt, bomb and endless loop ends in one clear ChatTemplateError,
writes no file and stops within the time limit."""
import time
import tracemalloc
from pathlib import Path

import pytest

from ggtorch.chat import apply_template
from ggtorch.errors import ChatTemplateError, GGTorchError
from ggtorch.jinja_sandbox import Limits, render

DATA = Path(__file__).parent / "data"
FAST = Limits(timeout_s=1.0)

# each writes MARK if it ever escapes the sandbox
ESCAPES = {
    # CVE-2024-34359 (llama-cpp-python rendered templates outside a sandbox)
    "subclasses_walk": "{% for x in ().__class__.__base__.__subclasses__() %}{% if 'warning' in x.__name__ %}"
                       "{{ x()._module.__builtins__['__import__']('os').system('touch MARK') }}{% endif %}{% endfor %}",
    "globals_of_a_global": "{{ raise_exception.__globals__['__builtins__']['open']('MARK', 'w') }}",
    "self_globals": "{{ self.__init__.__globals__.__builtins__.open('MARK', 'w') }}",
    "namespace_globals": "{{ namespace.__init__.__globals__['os'].system('touch MARK') }}",
    "cycler_globals": "{{ cycler.__init__.__globals__.os.system('touch MARK') }}",
    "dict_type": "{{ dict.__class__.__subclasses__() }}",
    "getitem_dunder": "{{ ''['__class__']['__mro__'][1]['__subclasses__']() }}",
    # CVE-2024-56326: str.format reached indirectly
    "format_stored": "{% set f = '{0.__init__.__globals__[os].system}'.format %}{{ f(raise_exception) }}",
    "format_map": "{{ '{x.__init__.__globals__}'.format_map({'x': raise_exception}) }}",
    "format_through_map": "{% for f in ['{0.__class__.__mro__}'] | map(attribute='format') %}{{ f(1) }}{% endfor %}",
    # CVE-2025-27516: |attr reaching format
    "attr_format": "{{ ('{0.__init__.__globals__}' | attr('format'))(raise_exception) }}",
    "attr_chain": "{{ raise_exception | attr('__globals__') | attr('__getitem__')('os') }}",
    "attr_class": "{{ () | attr('__class__') | attr('__base__') | attr('__subclasses__') }}",
    # no loader: templates cannot read files
    "include": "{% include '/etc/passwd' %}",
    "import": "{% import 'os' as os %}{{ os.system('touch MARK') }}",
    "extends": "{% extends '/etc/passwd' %}",
    "mutate_input": "{{ messages.append(1) }}{{ messages.clear() }}",
    "namespace_dunder": "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
}

BOMBS = {
    "nested_range_loops": "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
    "nested_list_loops": "{% set L = range(100000) | list %}{% for a in L %}{% for b in L %}{% endfor %}{% endfor %}",
    "infinite_recursion": "{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}",
    "exponential_recursion": "{% macro f(n) %}{% if n < 60 %}{{ f(n + 1) }}{{ f(n + 1) }}{% endif %}{% endmacro %}{{ f(0) }}",
    "output_flood": "{% for i in range(100000) %}{% for j in range(100000) %}xxxxxxxxxxxxxxxx{% endfor %}{% endfor %}",
    "string_repeat": "{{ 'x' * 1000000000 }}",
    "list_repeat": "{{ (range(1000) | list) * 10000000 }}",
    "doubling_concat": "{% set ns = namespace(s='0123456789') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
    "doubling_plus": "{% set ns = namespace(s='0123456789') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
    "shared_references": "{% set ns = namespace(a='x') %}{% for i in range(200) %}{% set ns.a = [ns.a, ns.a] %}{% endfor %}{{ ns.a }}",
    "shared_dict": "{% set ns = namespace(a='x') %}{% for i in range(200) %}{% set ns.a = {'l': ns.a, 'r': ns.a} %}{% endfor %}{{ ns.a == ns.a }}",
    "replace_blowup": "{% set s = 'x' * 100000 %}{{ s | replace('', s) }}",
    "join_blowup": "{% set s = 'x' * 1000000 %}{{ (range(100000) | list) | join(s) }}",
    "center_width": "{{ 'x' | center(1000000000) }}",
    "str_method_width": "{{ 'x'.ljust(1000000000) }}",
    "indent_blowup": "{% set s = '\\n' * 1000000 %}{{ s | indent(1000) }}",
    "percent_width": "{{ '%0999999999d' % 1 }}",
    "format_width": "{{ '{:>999999999}'.format(1) }}",
    "format_nested_width": "{{ '{:>{w}}'.format(1, w=999999999) }}",
    "tojson_indent": "{{ messages | tojson(indent=1000000000) }}",
    "int_power": "{{ 7 ** 1000000000 }}",
    "int_squaring": "{% set ns = namespace(n=7) %}{% for i in range(64) %}{% set ns.n = ns.n * ns.n %}{% endfor %}{{ ns.n }}",
    "batch_fill": "{{ [1] | batch(1000000000, 'x') | list }}",
    "lipsum": "{{ lipsum(100000, max=100000) }}",
}


@pytest.mark.parametrize("name", sorted(ESCAPES))
def test_escape_attempts_fail_cleanly(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    src = ESCAPES[name].replace("MARK", str(tmp_path / "escaped"))
    t0 = time.monotonic()
    with pytest.raises(ChatTemplateError) as e:
        render(src, {"messages": [{"role": "user", "content": "hi"}]}, FAST)
    assert isinstance(e.value, GGTorchError) and "\n" not in str(e.value) and str(e.value)
    assert time.monotonic() - t0 < 5
    assert list(tmp_path.iterdir()) == []  # nothing written, anywhere the payload aimed


@pytest.mark.parametrize("name", sorted(BOMBS))
def test_bombs_stop_with_a_clear_error(name, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    tracemalloc.start()
    t0 = time.monotonic()
    try:
        with pytest.raises(ChatTemplateError) as e:
            render(BOMBS[name], {"messages": [{"role": "user", "content": "hi"}]}, FAST)
        elapsed = time.monotonic() - t0
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert "\n" not in str(e.value)
    assert elapsed < 5, f"{name} ran {elapsed:.1f} s"
    assert peak < 300e6, f"{name} allocated {peak / 1e6:.0f} MB"
    assert list(tmp_path.iterdir()) == []


def test_limits_name_what_stopped_the_template():
    with pytest.raises(ChatTemplateError, match="ran longer than 1 s"):
        render(BOMBS["nested_list_loops"], {}, FAST)
    with pytest.raises(ChatTemplateError, match="output passed 1000 characters"):
        render("{% for i in range(2000) %}x{% endfor %}", {}, Limits(max_chars=1000))
    with pytest.raises(ChatTemplateError, match="recursed too deeply"):
        render(BOMBS["infinite_recursion"], {}, FAST)
    with pytest.raises(ChatTemplateError, match="refused the messages: no system role"):
        render("{{ raise_exception('no system role') }}", {})
    with pytest.raises(ChatTemplateError, match=r"does not parse \(line 2\)"):
        render("ok\n{% if %}", {})


def test_real_templates_render_long_conversations_within_the_limits():
    """No false alarms: a long, tool-using conversation renders in every corpus template that takes it."""
    msgs = [{"role": "system", "content": "s " * 500}]
    for i in range(300):
        msgs += [{"role": "user", "content": f"question {i} " + "word " * 200},
                 {"role": "assistant", "content": f"answer {i} " + "text " * 200}]
    msgs.append({"role": "user", "content": "last"})
    rendered = 0
    for path in sorted((DATA / "chat_templates").glob("*.jinja")):
        t0 = time.monotonic()
        try:
            out = apply_template(path.read_text(), msgs, bos_token="<s>", eos_token="</s>")
        except ChatTemplateError as e:
            assert "limit" not in str(e) and "stopped" not in str(e), (path.name, str(e))
            continue
        assert "question 299" in out and len(out) > 600_000
        assert time.monotonic() - t0 < 5, path.name
        rendered += 1
    assert rendered >= 15


def test_message_text_is_data_not_template():
    src = "{% for m in messages %}{{ m.content }}{% endfor %}"
    text = "{{ 7*7 }}{% for x in range(3) %}{{ x }}{% endfor %}{{ ''.__class__ }}"
    assert apply_template(src, [{"role": "user", "content": text}]) == text


def test_inputs_must_be_plain_data():
    with pytest.raises(ChatTemplateError, match="messages must be a list"):
        apply_template("x", "hello")
    with pytest.raises(ChatTemplateError, match="no string 'role'"):
        apply_template("x", [{"content": "hi"}])
    with pytest.raises(ChatTemplateError, match="holds a"):
        apply_template("x", [{"role": "user", "content": object()}])
    # objects never reach a template: a Path becomes an error, not a live object
    with pytest.raises(ChatTemplateError):
        apply_template("{{ messages[0].content.write_text('x') }}", [{"role": "user", "content": Path("/tmp/x")}])
