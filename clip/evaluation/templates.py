"""Prompt templates for zero-shot classification.

A template is a format string with exactly one "{}" for the class name (or any callable
classname -> prompt). The built-in sets below were written for this project; to reproduce the CLIP paper's
numbers, put the paper's templates in a file (a JSON list, or one template per line) and pass its path.
"""

from __future__ import annotations

import ast
import json
import re
import string
from collections.abc import Callable, Sequence
from pathlib import Path

from clip.config_io import short_repr, where_not_utf8

Template = str | Callable[[str], str]
# A class's name, or its names: a list of several, each prompted with every template and the class's embedding
# the mean over all those prompts (the CLIP paper's FER2013 classes, ['happy', 'smiling']); the first names the
# class in results
ClassName = str | list[str]

# Varied phrasings (medium, quality, framing) so that averaging the class embeddings over them smooths out
# the quirks of any one sentence -- the reason prompt ensembles beat a single prompt.
DEFAULT_TEMPLATES: tuple[str, ...] = (
    "a photo of a {}.",
    "an image showing a {}.",
    "a snapshot of a {}.",
    "a close-up of a {}.",
    "a {} seen from far away.",
    "a grainy picture of a {}.",
    "a sharp, well-lit photo of a {}.",
    "a dim photo of a {}.",
    "a simple drawing of a {}.",
    "a painting of a {}.",
    "a cartoon {}.",
    "a small {} in the picture.",
    "a large {} filling the frame.",
    "there is a {} in this image.",
)

BUILTIN_TEMPLATE_SETS: dict[str, tuple[str, ...]] = {
    "default": DEFAULT_TEMPLATES,
    "simple": ("a photo of a {}.",),
}


def builtin_templates(name: str = "default") -> list[str]:
    if name not in BUILTIN_TEMPLATE_SETS:
        raise ValueError(f"unknown built-in template set {name!r}; choose one of {sorted(BUILTIN_TEMPLATE_SETS)}")
    return list(BUILTIN_TEMPLATE_SETS[name])


def validate_template(template: str) -> None:
    """A template must take the class name through exactly one plain "{}" (or "{0}"), and no other
    replacement field. Format specs, conversions and attribute or index access are refused: a templates file
    is read from disk, and "{:>9999999999}" made every prompt 10 GB long (a MemoryError), "{0.__class__}"
    reaches into the class name's object."""
    if not isinstance(template, str):
        raise ValueError(f"template {template!r} is a {type(template).__name__}, not a string")
    try:
        fields = [(name, spec, conversion) for _, name, spec, conversion in string.Formatter().parse(template)
                  if name is not None]
    except ValueError as error:
        raise ValueError(f"template {template!r} is not a format string with one '{{}}': {error}") from None
    if len(fields) != 1:
        raise ValueError(f"template {template!r} must contain exactly one '{{}}' for the class name")
    name, spec, conversion = fields[0]
    if name not in ("", "0") or spec or conversion:
        field = "{" + name + (f"!{conversion}" if conversion else "") + (f":{spec}" if spec else "") + "}"
        raise ValueError(
            f"template {template!r} is not a format string with one '{{}}': its field {field!r} must be a plain "
            f"'{{}}' for the class name"
        )


def fill_template(template: Template, classname: str) -> str:
    return template(classname) if callable(template) else template.format(classname)


def python_string_literals(line: str) -> list[str] | None:
    """The strings of a line copied from a Python list, such as `'a photo of a {}.',` from the CLIP paper's
    prompts.md or `"tench", "goldfish", "great white shark",` from a list wrapped several to a line; None when
    the line is not quoted strings alone, separated by commas (with an optional trailing one)."""
    text = line.strip()
    if len(text) < 2 or text[0] not in "'\"":
        return None
    try:
        value = ast.literal_eval(text)  # literals only, never code; undoes escapes like \'
    except (ValueError, SyntaxError, MemoryError, RecursionError):
        return None
    values = list(value) if isinstance(value, tuple) else [value]  # "'a'," and "'a', 'b'" are tuples
    return values if values and all(isinstance(item, str) for item in values) else None


def python_literal(text: str) -> object:
    """`text` read as a Python literal (`['a photo of a {}.', ...]`, as the CLIP paper's prompts.md writes its
    lists), or None where it is none. Parsed as a literal, never run as code."""
    try:
        return ast.literal_eval(text.strip())
    except (ValueError, TypeError, SyntaxError, MemoryError, RecursionError):
        return None


def is_string_list(value: object) -> bool:
    return isinstance(value, list) and all(isinstance(item, str) for item in value)


def is_list_of_string_lists(value: object) -> bool:
    """Whether `value` is a list whose entries are lists of strings, or some strings and some such lists
    (`[['angry'], ['happy', 'smiling']]`): several names per class, as the CLIP paper's prompts.md gives
    FER2013's classes."""
    return (isinstance(value, list) and any(isinstance(item, list) for item in value)
            and all(map(_is_names_entry, value)))


def _is_names_entry(item: object) -> bool:
    """A string, or a non-empty list of strings: an entry of `is_list_of_string_lists`."""
    return isinstance(item, str) or (is_string_list(item) and bool(item))


def unquote_copied_python_lines(lines: list[str], path: Path) -> list[str]:
    """Lines that are all quoted Python strings lose their quotes and commas (a line of several gives each);
    plain lines stay as they are. A mix (e.g. `templates = [` copied along with the strings) is an error:
    either reading would give prompts with stray code or quotes in them."""
    literals = [python_string_literals(line) for line in lines]
    quoted = [line for line, literal in zip(lines, literals, strict=True) if literal is not None]
    if not quoted:
        return lines
    plain = [line for line, literal in zip(lines, literals, strict=True) if literal is None]
    if plain:
        raise ValueError(
            f"{path}: some lines are quoted Python strings (e.g. {quoted[0]!r}) and some are not (e.g. "
            f"{plain[0]!r}); write one entry per line without quotes and commas, or a JSON list"
        )
    return [item for literal in literals if literal is not None for item in literal]


def _decode_text(data: bytes, path: Path) -> str:
    """UTF-8 (a byte-order mark dropped: Notepad and spreadsheet exports write one, and it would become part
    of the first class name or stop a JSON list from parsing), or UTF-16 with its byte-order mark (Windows'
    "Unicode" text); anything else is an error that names the file and the byte."""
    if data.startswith((b"\xff\xfe", b"\xfe\xff")):
        try:
            return data.decode("utf-16")
        except UnicodeDecodeError:
            pass  # not UTF-16 after all: reported as not UTF-8 below
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise ValueError(f"{path} is not UTF-8 text: {where_not_utf8(error)}; save it as UTF-8") from None


# `templates = [` or `imagenet_classes = [`: the start of a list's assignment, as the CLIP paper's prompts.md
# and OpenAI's ImageNet notebook write every list, copied along with the list; or annotated, as typed code
# writes it (`templates: list[str] = [`), the annotation being anything up to the `=`
LIST_ASSIGNMENT = re.compile(r"\s*[A-Za-z_]\w*\s*(:[^=\n]+)?=\s*(?=\[)")


def _read_string_list(path: Path, what: str, comments: bool, several_per_entry: bool = False) -> list:
    """A JSON list of strings, or one string per line (blank lines skipped, and '#' lines if `comments`).
    Lines copied from a Python list (`'a photo of a {}.',`) are read as the strings they quote, and a Python
    list copied whole (`[` to `]`, or with its assignment: `templates = [` to `]`) as its strings.
    `several_per_entry`: a list whose entries are lists of strings is read too, each entry of one string as that
    string (class names, `ClassName`)."""
    if path.is_dir():  # "not found" of a folder that is there sent the user looking for it
        raise IsADirectoryError(f"{what} file {path} is a folder; give the file")
    if not path.is_file():
        raise FileNotFoundError(f"{what} file not found: {path}")
    text = _decode_text(path.read_bytes(), path)
    assignment = LIST_ASSIGNMENT.match(text)
    if assignment:  # read as the list it assigns: the lines, `templates = [` among them, were refused as a mix
        text = text[assignment.end():]
        assigned = python_literal(text)
        if not (is_string_list(assigned) or is_list_of_string_lists(assigned)):
            raise ValueError(
                f"{path}: starts as a Python list's assignment ({assignment.group().strip()!r}), but what follows "
                f"is not one whole list of strings: copy the list alone, from its `[` to its `]`"
            )
    # "{0: 'a", "{'a': ", '{"0": ', a lone "{"; not a template's placeholder, "{} ...", "{0} ..." or "{0:>9} ..."
    if re.match(r"\s*\{\s*(['\"]|\d+\s*:\s*['\"\[]|$)", text, flags=re.MULTILINE):
        # A mapping such as ImageNet's {0: 'tench, Tinca tinca', ...} read line by line gives as many
        # "names" as classes, each a line of the mapping's source, and the prompts made of them still run.
        order = ", in label order" if what == "class names" else ""
        raise ValueError(
            f"{path}: a mapping ({{...}}), not a list: {what} are read from a JSON list of strings or from one "
            f"per line{order}"
        )
    if path.suffix == ".json" or text.lstrip().startswith("["):
        try:
            items = json.loads(text)
        except ValueError as error:  # JSONDecodeError, and an integer of more than 4300 digits
            # The CLIP paper's prompts.md writes its lists in Python, single-quoted: a list copied whole,
            # brackets and all, was refused as "not valid JSON"
            items = python_literal(text)
            if several_per_entry and not (is_string_list(items) or is_list_of_string_lists(items)):
                # The lines of a list of lists copied without its brackets (`['happy', 'smiling'],` ...)
                items = python_literal(f"[{text}]")
            if not (is_string_list(items) or is_list_of_string_lists(items)):
                raise ValueError(f"{path}: not valid JSON ({error})") from None
        except RecursionError:  # json parses nested arrays recursively
            raise ValueError(f"{path}: not valid JSON (its arrays nest too deeply)") from None
        if is_list_of_string_lists(items) and several_per_entry:
            items = [item[0] if isinstance(item, list) and len(item) == 1 else item for item in items]
        elif not is_string_list(items):
            if is_list_of_string_lists(items):  # was "not valid JSON", or "expected a JSON list of strings"
                raise ValueError(
                    f"{path}: a list of lists, several {what} to an entry (as the CLIP paper lists FER2013's "
                    f"classes), which is not supported here: give one string per entry"
                )
            if several_per_entry and isinstance(items, list) and any(isinstance(item, list) for item in items):
                index, item = next((index, item) for index, item in enumerate(items) if not _is_names_entry(item))
                raise ValueError(f"{path}: entry {index} ({short_repr(item)}) is neither a name nor a list of names: "
                                 f"each entry is a string, or a non-empty list of strings (a class's several names)")
            raise ValueError(f"{path}: expected a JSON list of strings")
    else:
        items = [line.strip() for line in text.splitlines()]
        items = [line for line in items if line and not (comments and line.startswith("#"))]
        items = unquote_copied_python_lines(items, path)
    if not items:
        raise ValueError(f"{path}: no {what} entries found")
    return items


def load_templates(path: str | Path) -> list[str]:
    """Templates from a file: a JSON list, or one template per line ('#' starts a comment line); a Python
    list of strings, whole or its lines, is read as its strings."""
    templates = _read_string_list(Path(path), "templates", comments=True)
    for template in templates:
        try:
            validate_template(template)
        except ValueError as error:  # the file is what to fix: a classnames file given as templates_file, say
            raise ValueError(f"{path}: {error}") from None
    return templates


def load_classnames(path: str | Path) -> list[ClassName]:
    """Class names from a file, in label order: a JSON list, or one name per line. A list of lists (the CLIP
    paper's FER2013 classes, `[['angry'], ['happy', 'smiling'], ...]`) gives a class several names: a class of
    one name is that string, one of several their list (`ClassName`)."""
    names = _read_string_list(Path(path), "class names", comments=False, several_per_entry=True)
    for index, name in enumerate(names):
        if any(not each.strip() for each in names_of(name)):
            # "" in a JSON list: found when the evaluation prompts it, which for training's is after its first steps
            raise ValueError(f"{path}: entry {index} ({name!r}) holds a blank name: every class needs its name")
    return names


def one_name_each(classnames: Sequence[ClassName], source: str | Path | None = None) -> list:
    """`classnames` as they are, where no class has several names (a list or tuple of them); a ValueError where one
    has: an image folder's names label its folders, one each. `source`: the classnames.txt they came from, or None
    for names passed to ImageFolderDataset."""
    several = [index for index, name in enumerate(classnames) if isinstance(name, list | tuple)]
    if several:
        index = several[0]
        where = (f"{source}: gives class {index} several names" if source is not None else
                 f"ImageFolderDataset's classnames[{index}] is several names")
        fix = ("give a file of several names as the dataset's classnames_file" if source is not None else
               "give the zero-shot functions' classnames the several names instead")
        raise ValueError(f"{where} ({short_repr(classnames[index])}); an image folder's class names label its "
                         f"folders, one name each: {fix}")
    return list(classnames)


def first_names(classnames: Sequence[ClassName]) -> list[str]:
    """Each class's name in results: its own, or the first of its several."""
    return [names_of(name)[0] for name in classnames]


def names_of(class_name: ClassName) -> list[str]:
    """Every name of one class: its one name, or its several."""
    return [class_name] if isinstance(class_name, str) else list(class_name)


def resolve_templates(templates: Sequence[Template] | str | Path | None) -> list[Template]:
    """None -> the default set; a built-in set's name; a file path; or an explicit sequence (checked)."""
    if templates is None:
        return builtin_templates("default")
    if isinstance(templates, str) and templates in BUILTIN_TEMPLATE_SETS:
        return builtin_templates(templates)
    if isinstance(templates, str) and "{}" in templates and not Path(templates).is_file():
        # A template, not a path: read as a file name it would fail as "templates file not found".
        raise ValueError(
            f"templates={templates!r} looks like a single template, not a file or a built-in set's name; "
            f"pass a single template as a list: [{templates!r}]"
        )
    if isinstance(templates, str | Path) and not Path(templates).is_file():
        raise FileNotFoundError(
            f"templates={str(templates)!r} is neither a built-in template set ({', '.join(BUILTIN_TEMPLATE_SETS)}) "
            "nor an existing file"
        )
    if isinstance(templates, str | Path):
        return load_templates(templates)
    resolved = list(templates)
    if not resolved:
        raise ValueError("no templates given")
    for template in resolved:
        if not callable(template):
            validate_template(template)
    return resolved
