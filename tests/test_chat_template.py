"""Chat template rendering: same text as transformers, and hostile templates stopped."""

from __future__ import annotations

import threading
import time

import pytest
from tiny_models import CHAT_TEMPLATE

from pied.chat_template import (
    ChatTemplateError,
    check_chat_template,
    load_chat_template,
    render_chat_template,
)

MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "héllo wörld 😀 日本語 <b>&amp;</b>"},
    {"role": "assistant", "content": "  Hi!  "},
    {"role": "user", "content": "What's 2+2?"},
]
TOOLS = [
    {
        "type": "function",
        "function": {
            "name": "add",
            "description": "Add two numbers — exactly.",
            "parameters": {
                "type": "object",
                "properties": {"a": {"type": "number"}, "b": {"type": "number"}},
            },
        },
    }
]

# In the style of real templates: whitespace control, namespaces, loop variables, tojson with
# options, raise_exception, strftime_now, the generation tag and loop controls.
LLAMA_STYLE = """{{- bos_token }}
{%- set ns = namespace(system='', count=0) %}
{%- if messages[0]['role'] == 'system' %}
    {%- set ns.system = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- endif %}
<|start_header_id|>system<|end_header_id|>

Year: {{ strftime_now('%Y') }}
{{ ns.system }}
{%- if tools %}
Tools:
{%- for tool in tools %}
{{ tool | tojson(indent=2) }}
{%- endfor %}
{%- endif %}<|eot_id|>
{%- for message in messages %}
    {%- if message['role'] not in ['user', 'assistant'] %}
        {{- raise_exception('Unknown role: ' + message['role']) }}
    {%- endif %}
    {%- set ns.count = ns.count + 1 %}
    {%- if loop.first and message['role'] != 'user' %}{{ raise_exception('user first') }}{% endif %}
<|start_header_id|>{{ message['role'] }}<|end_header_id|>

{% if message['role'] == 'assistant' %}{% generation %}{{ message['content'] | trim }}{% endgeneration %}{% else %}{{ message['content'] }}{% endif %}<|eot_id|>
{%- endfor %}
{%- if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>

{% endif %}
"""

BLOCKS = """{% for message in messages %}
    {% if loop.index0 > 1 %}{% break %}{% endif %}
    {% if message.role == 'system' %}
        {% continue %}
    {% endif %}
  [{{ loop.index }}:{{ message.role | upper }}] {{ message.content }}
{% endfor %}
{{ dict(a=1, b=[1, 2]) | tojson }} {{ {'k': 'ü'} | tojson }} {{ messages | length }} {{ '%-5s|' % 'ab' }} {{ '{:>4}'.format(7) }}
"""

# Every loop feature: the loop guard must not change what loops do.
LOOPS = """{% for m in messages if m.role != 'system' %}{{ loop.index }}/{{ loop.length }} {{ loop.revindex }} \
{{ loop.last }} {{ loop.previtem.role if loop.previtem else '-' }} {{ loop.nextitem.role if loop.nextitem else '-' }} \
{{ loop.cycle('odd', 'even') }} {{ m.role }}
{% else %}empty{% endfor %}
{% for k, v in {'a': 1, 'b': 2}.items() %}{{ k }}={{ v }};{% endfor %}
{% for item in tree recursive %}[{{ item.name }}{% if item.children %}{{ loop(item.children) }}{% endif %}]{% endfor %}
{% for x in [] %}x{% else %}none{% endfor %}
{% for a, b in [(1, 2), (3, 4)] %}{{ a + b }}{% endfor %}{{ messages | map(attribute='role') | join(',') }}
{% set ns = namespace(found=false) %}{% for m in messages %}{% if m.role == 'user' %}{% set ns.found = true %}{% endif %}\
{% endfor %}{{ ns.found }} {{ "a,b".split(",") }} {{ messages[-1]['content'][:3] }} {{ (messages | last).role }}"""
TREE = [
    {"name": "r", "children": [{"name": "c1", "children": []}, {"name": "c2", "children": [{"name": "g"}]}]}
]


@pytest.mark.parametrize(
    "template", [CHAT_TEMPLATE, LLAMA_STYLE, BLOCKS, LOOPS], ids=["chatml", "llama", "blocks", "loops"]
)
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_renders_like_transformers(template, add_generation_prompt):
    chat_template_utils = pytest.importorskip("transformers.utils.chat_template_utils")
    variables = {"bos_token": "<s>", "eos_token": "</s>", "tree": TREE}
    (expected,), _ = chat_template_utils.render_jinja_template(
        conversations=[MESSAGES],
        tools=TOOLS,
        chat_template=template,
        add_generation_prompt=add_generation_prompt,
        **variables,
    )
    rendered = render_chat_template(
        template, MESSAGES, add_generation_prompt=add_generation_prompt, tools=TOOLS, variables=variables
    )
    assert rendered == expected


def test_variables_cannot_shadow_the_conversation_or_lift_limits():
    with pytest.raises(ChatTemplateError, match="cannot set messages, tools"):
        render_chat_template(CHAT_TEMPLATE, MESSAGES, variables={"messages": [], "tools": []})
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    with pytest.raises(ChatTemplateError, match="took longer"):
        render_chat_template(
            slow, [], timeout_s=0.2, variables={"timeout_s": 1e9, "max_output_chars": 10**12}
        )


def test_raise_exception_message_reaches_the_user():
    with pytest.raises(ChatTemplateError, match="^Unknown role: tool$"):
        render_chat_template(LLAMA_STYLE, [{"role": "tool", "content": "x"}], variables={"bos_token": ""})


def test_syntax_error_names_the_line():
    with pytest.raises(ChatTemplateError, match=r"not valid Jinja \(line 2\)"):
        render_chat_template("ok\n{% for x in %}", [])
    with pytest.raises(ChatTemplateError, match="not valid Jinja"):
        check_chat_template("{% if %}")
    check_chat_template(CHAT_TEMPLATE)


def test_runtime_errors_become_chat_template_errors():
    with pytest.raises(ChatTemplateError, match="the chat template failed: UndefinedError"):
        render_chat_template("{{ missing.attribute }}", [])
    with pytest.raises(ChatTemplateError, match="TypeError"):
        render_chat_template("{{ messages + 1 }}", [])


def test_messages_must_be_objects():
    with pytest.raises(ChatTemplateError, match="must be an object"):
        render_chat_template(CHAT_TEMPLATE, ["hi"])  # type: ignore[list-item]


def test_rich_objects_reach_templates_as_plain_data():
    class Rich:
        def delete_everything(self) -> None:  # a method the sandbox does not know is dangerous
            raise AssertionError("called")

    messages = [{"role": "user", "content": "x", "extra": Rich(), "parts": ("a", 1)}]
    rendered = render_chat_template("{{ messages[0].extra }} {{ messages[0].parts }}", messages)
    assert rendered == "<Rich> ('a', 1)"
    with pytest.raises(ChatTemplateError):
        render_chat_template("{{ messages[0].extra.delete_everything() }}", messages)


def test_continue_final_message():
    messages = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "The answer is"}]
    rendered = render_chat_template(
        CHAT_TEMPLATE, messages, add_generation_prompt=False, continue_final_message=True
    )
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\nThe answer is"
    with pytest.raises(ChatTemplateError, match="cannot both be true"):
        render_chat_template(CHAT_TEMPLATE, messages, add_generation_prompt=True, continue_final_message=True)
    with pytest.raises(ChatTemplateError, match="does not render"):
        render_chat_template("nothing", messages, add_generation_prompt=False, continue_final_message=True)


def test_messages_are_not_modified():
    messages = [{"role": "assistant", "content": "The answer is"}]
    render_chat_template(CHAT_TEMPLATE, messages, add_generation_prompt=False, continue_final_message=True)
    assert messages == [{"role": "assistant", "content": "The answer is"}]


# ---------------------------------------------------------------- hostile templates


def assert_stopped(template: str, match: str, timeout_s: float = 0.5, **limits) -> None:
    start = time.monotonic()
    with pytest.raises(ChatTemplateError, match=match):
        render_chat_template(template, MESSAGES, timeout_s=timeout_s, **limits)
    assert time.monotonic() - start < timeout_s + 2.0


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}",
        "{% for i in range(100000) %}{% for j in range(100000) %}{{ '' }}{% endfor %}{% endfor %}",
        "{% for m in messages * 1000 %}{% for n in messages * 1000 %}{% for o in range(1000) %}"
        "{% endfor %}{% endfor %}{% endfor %}",
        "{% macro f(n) %}{% for i in range(100000) %}{{ f(n + 1) if n < 3 else '' }}{% endfor %}{% endmacro %}{{ f(0) }}",
        "{% for x in range(100000) recursive %}{% for y in range(100000) %}{% endfor %}{% endfor %}",
    ],
    ids=["nested", "nested-output", "nested-data", "macro", "recursive"],
)
def test_runaway_loops_hit_the_deadline(template):
    assert_stopped(template, "took longer than 0.5 s")


def test_huge_range_is_refused():
    assert_stopped("{% for i in range(10**9) %}x{% endfor %}", "(?i)range too big")


def test_unbounded_recursion_is_stopped():
    assert_stopped("{% macro f() %}{{ f() }}{% endmacro %}{{ f() }}", "recursed too deeply")


@pytest.mark.parametrize(
    "template",
    [
        "{% for i in range(100000) %}{{ 'x' * 1000 }}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s ~ ns.s %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s = ns.s + ns.s %}{% endfor %}",
        "{% set ns = namespace(l=[1]) %}{% for i in range(64) %}{% set ns.l = ns.l + ns.l %}{% endfor %}",
        "{% set ns = namespace(s='ab') %}{% for i in range(64) %}{% set ns.s %}{{ ns.s }}{{ ns.s }}{% endset %}{% endfor %}",
        "{{ 'x' * 10**10 }}",
        "{{ [0] * 10**9 }}",
        "{{ 'x' | center(10**10) }}",
        "{{ 'x'.ljust(10**10) }}",
        "{{ 'x' | indent(10**10) }}",
        "{{ '%1000000000s' % 'x' }}",
        "{{ '%*s' | format(10**10, 'x') }}",
        "{{ '{:>1000000000}'.format('x') }}",
        "{{ '{:>{w}}'.format('x', w=10**10) }}",
        "{{ ('x' * 4000).replace('', 'y' * 5000) }}",
        "{{ ('x' * 4000) | replace('x', 'y' * 5000) }}",
        "{{ ([('x' * 1000000)] * 100) | join }}",
        "{{ ('-' * 1000).join(['x'] * 100000) }}",
        "{% set l = [0] * 100000 %}{{ [l] * 100000 }}",
        "{% set l = [0] * 100000 %}{{ ([l] * 100000) | string | length }}",
        "{% set l = [0] * 100000 %}{{ ([l] * 100000) ~ '' }}",
        "{{ range(100) | list | tojson(indent=100000) }}",
        "{{ 7 ** (10 ** 6) }}",
    ],
)
def test_memory_amplifiers_are_refused(template):
    assert_stopped(template, "more than|limit", timeout_s=5.0, max_output_chars=10_000_000)


def test_output_cap():
    template = "{% for i in range(1000) %}{{ messages[1].content }}{% endfor %}"
    assert_stopped(template, "wrote more than 5000 characters", max_output_chars=5000)
    assert len(render_chat_template(template, MESSAGES, max_output_chars=100_000)) > 5000


@pytest.mark.parametrize(
    "template",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ namespace.__init__.__globals__ }}",
        "{% set x = messages.append(1) %}",
        "{% set x = messages[0].update({'role': 'x'}) %}",
        "{% set ns = namespace(__class__=1) %}",
        "{% include '/etc/passwd' %}",
        "{% import 'os' as os %}{{ os.system('true') }}",
        "{% extends '/etc/passwd' %}",
        "{{ self._TemplateReference__context }}",
    ],
)
def test_sandbox_escapes_fail(template):
    try:
        rendered = render_chat_template(template, MESSAGES)
    except ChatTemplateError:
        return
    # Some lookups are merely undefined in the sandbox (empty text); none may reveal anything.
    assert rendered.strip() == ""


def test_limits_are_per_render_and_per_thread():
    slow = "{% for i in range(100000) %}{% for j in range(100000) %}{% endfor %}{% endfor %}"
    errors: list[str] = []

    def hostile() -> None:
        try:
            render_chat_template(slow, [], timeout_s=0.5)
        except ChatTemplateError as error:
            errors.append(str(error))

    thread = threading.Thread(target=hostile)
    thread.start()
    for _ in range(50):  # meanwhile, ordinary renders on this thread are unaffected
        assert render_chat_template(CHAT_TEMPLATE, MESSAGES).startswith("<|im_start|>system")
    thread.join()
    assert errors and "took longer" in errors[0]
    assert render_chat_template(CHAT_TEMPLATE, MESSAGES, timeout_s=0.5)  # nothing left over


# ---------------------------------------------------------------- --chat-template


def test_load_from_file(tmp_path):
    path = tmp_path / "template.jinja"
    path.write_text("{{ 'é' }}\n{% for m in messages %}{{ m.content }}{% endfor %}", encoding="utf-8")
    assert load_chat_template(str(path)) == path.read_text(encoding="utf-8")
    assert load_chat_template(path) == path.read_text(encoding="utf-8")


def test_load_literal_decodes_escapes():
    template = load_chat_template("{% for m in messages %}{{ m.content }}\\n{% endfor %}é日")
    assert template == "{% for m in messages %}{{ m.content }}\n{% endfor %}é日"


def test_load_missing_file_names_it(tmp_path):
    missing = tmp_path / "nope.jinja"
    with pytest.raises(ChatTemplateError, match="nope.jinja"):
        load_chat_template(str(missing))
    with pytest.raises(ChatTemplateError, match="nope.jinja"):
        load_chat_template(missing)
    with pytest.raises(ChatTemplateError, match="cannot read"):
        load_chat_template(str(tmp_path))  # a folder
