"""The user's own model: `path/to/net.py:Net` or `package.module:build`, an nn.Module class or
a function that returns one.

Loading code is running code. A new run reads the model's source file once, runs exactly
those bytes and keeps them in the run directory with their SHA-256 (`Source`); the user's
cache folder remembers each file and hash this user has trained with (`remember`). Whatever
rebuilds the model later (eval, predict, export, report, --resume) runs that copy, and only
while the file at the recorded path still has the recorded hash and is one the user trained
with here - a run someone sent (whose checkpoint may name any file), or one whose file has
changed since, is refused in one line unless the user says `--trust-code` after reading the
copy."""

from __future__ import annotations

import ast
import hashlib
import importlib
import importlib.util
import inspect
import re
import sys
import traceback
import types
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from ..errors import CnnlabError, one_line
from ..files import user_cache_dir

# the dataset's facts a constructor may take, by these names
FACTS = ("in_channels", "num_classes", "image_size")
_DOTTED = re.compile(r"[A-Za-z_]\w*(\.[A-Za-z_]\w*)*")


def _split(name: str) -> tuple[str, str]:
    where, _, attr = name.rpartition(":")
    if not attr.isidentifier() or not where:
        raise CnnlabError(f"model {name!r}: name the class or function after the colon, as in "
                          "path/to/net.py:Net or package.module:build")
    return where, attr


def _is_path(where: str) -> bool:
    return where.endswith(".py") or "/" in where or "\\" in where


def absolute(name: str) -> str:
    """`name` with its file's path made absolute (a run rebuilds it from any folder); a file
    that is not there, or not Python, is one line."""
    where, attr = _split(name)
    if not _is_path(where):
        if not _DOTTED.fullmatch(where):
            raise CnnlabError(f"model {name!r}: before the colon give a .py file or an "
                              "importable module (package.module)")
        return name
    path = Path(where).expanduser().resolve()
    if path.suffix != ".py":
        raise CnnlabError(f"model {name!r}: {where} is not a .py file")
    if not path.is_file():
        raise CnnlabError(f"model file not found: {where} (give path/to/net.py:{attr})")
    return f"{path}:{attr}"


def label(name: str) -> str:
    """A short name for tables and folder names: net.py:Net, package.module:build."""
    where, attr = _split(name)
    return f"{Path(where).name}:{attr}" if _is_path(where) else name


@dataclass(frozen=True)
class Source:
    """Where a model's code is: the file, the class or function in it, the module it is
    imported as (None: a file given by path) and the SHA-256 of its bytes."""

    file: str | None       # None: defined in an interactive session (a notebook)
    attr: str
    module: str | None
    sha256: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: Any) -> Source:
        try:
            return cls(**{k: data[k] for k in ("file", "attr", "module", "sha256")})
        except (TypeError, KeyError):
            raise CnnlabError("the checkpoint's record of its model's source is damaged") \
                from None


def _digest(text: bytes) -> str:
    return hashlib.sha256(text).hexdigest()


def _read(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as e:
        raise CnnlabError(f"cannot read model file {path}: {e.strerror or e}") from None


def locate(name: str) -> tuple[Source, bytes]:
    """The source of model `name` (absolute, see `absolute`) and its bytes, as a new run
    keeps them. A module is found without running it."""
    where, attr = _split(name)
    if _is_path(where):
        text = _read(Path(where))
        return Source(where, attr, None, _digest(text)), text
    try:
        spec = importlib.util.find_spec(where)
    except (ImportError, ValueError) as e:  # its package failed to import
        raise CnnlabError(f"model module {where} cannot be found: {one_line(e, 200)}") from None
    if spec is None or not spec.origin or not spec.origin.endswith(".py"):
        raise CnnlabError(f"model module {where} is not an importable Python file (is it on "
                          "the path? run from the folder that holds it, or give "
                          f"path/to/{where.rsplit('.', 1)[-1]}.py:{attr})")
    text = _read(Path(spec.origin))
    return Source(spec.origin, attr, where, _digest(text)), text


def of_instance(module: Any) -> tuple[Source, bytes | None]:
    """The source of an nn.Module instance's class and its bytes; no file (and None) for a
    class defined in an interactive session (a notebook)."""
    cls = type(module)
    try:
        file = inspect.getsourcefile(cls)
    except TypeError:  # a class of a module without a file
        file = None
    if not file or not Path(file).is_file() or "<" in cls.__qualname__:
        return Source(None, cls.__qualname__, None, ""), None
    text = _read(Path(file))
    owner = cls.__module__
    importable = owner != "__main__" and getattr(sys.modules.get(owner), "__spec__", None)
    return Source(str(Path(file).resolve()), cls.__qualname__, owner if importable else None,
                  _digest(text)), text


def run_text(source: Source, text: bytes) -> Any:
    """Run a model file's `text` as a module (the file's folder on the path meanwhile, as
    for a script) and return its class or function `source.attr`."""
    name = f"cnnlab_model_{source.sha256[:16]}"
    module = sys.modules.get(name)
    if module is None:
        module = types.ModuleType(name)
        module.__file__ = source.file
        folder = str(Path(source.file).parent)
        sys.path.insert(0, folder)
        sys.modules[name] = module  # dataclasses and pickling look their module up
        try:
            exec(compile(text, source.file, "exec"), module.__dict__)
        except BaseException as e:
            del sys.modules[name]
            if isinstance(e, KeyboardInterrupt):
                raise
            raise CnnlabError(f"model file {source.file} failed to run: "
                              f"{_where(e, source.file)}{type(e).__name__}: "
                              f"{one_line(e, 200)}") from None
        finally:
            sys.path.remove(folder)
    return _attr(module, source)


def _where(e: BaseException, file: str) -> str:
    if isinstance(e, SyntaxError):
        return f"line {e.lineno}: "
    lines = [f.lineno for f in traceback.extract_tb(e.__traceback__) if f.filename == file]
    return f"line {lines[-1]}: " if lines else ""


def _attr(module: types.ModuleType, source: Source) -> Any:
    found = module
    for part in source.attr.split("."):
        found = getattr(found, part, None)
    if not callable(found):
        offered = sorted(k for k, v in vars(module).items()
                         if callable(v) and getattr(v, "__module__", None) == module.__name__
                         and not k.startswith("_"))
        raise CnnlabError(f"{source.file} has no class or function {source.attr}"
                          f"{'; it defines ' + ', '.join(offered) if offered else ''}")
    return found


def import_module(source: Source) -> Any:
    """The class or function of a `package.module:attr` model, imported as usual."""
    try:
        module = importlib.import_module(source.module)
    except Exception as e:  # the user's module: anything may go wrong in it
        raise CnnlabError(f"model module {source.module} failed to import: "
                          f"{_where(e, source.file)}{type(e).__name__}: "
                          f"{one_line(e, 200)}") from None
    return _attr(module, source)


def load_new(name: str) -> tuple[Any, Source, bytes]:
    """A new run's model code: the class or function, its source and the bytes it ran."""
    source, text = locate(name)
    if source.module is None:
        return run_text(source, text), source, text
    found = import_module(source)
    if _digest(_read(Path(source.file))) != source.sha256:  # changed while it was imported
        raise CnnlabError(f"model file {source.file} changed while it was loaded; run again")
    return found, source, text


_TRAINED_WITH = "trained-models.txt"  # in the user's cache folder: "sha256 path" a line


def remember(source: Source) -> None:
    """Note that this user trains with `source` (its file and hash) on this machine."""
    if source.file is None or _known(source):
        return
    path = user_cache_dir() / _TRAINED_WITH
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with path.open("a") as f:  # one short line: appended whole
            f.write(f"{source.sha256} {source.file}\n")
    except OSError:  # an unwritable cache: later commands ask for --trust-code
        pass


def _known(source: Source) -> bool:
    try:
        lines = (user_cache_dir() / _TRAINED_WITH).read_text().splitlines()
    except OSError:
        return False
    return f"{source.sha256} {source.file}" in lines


def _origin(module: str) -> Path | None:
    """The file module `module` would be imported from (its packages are imported to tell)."""
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        return None
    return Path(spec.origin).resolve() if spec and spec.origin else None


def load_kept(source: Source, copy: Path | None, *, trust: bool) -> Any:
    """The class or function a run was trained with, from the copy of its source it keeps
    (`copy`, the run directory's). Only the user's own, unchanged file is run without
    `trust`; anything else is refused in one line that says why and what to do."""
    if source.file is None:
        raise CnnlabError(f"this run's model {source.attr} was defined in an interactive "
                          "session, so the run has no source to rebuild it from; define it in "
                          "a .py file and train again")
    kept = _read(copy) if copy is not None and copy.is_file() else None
    mine = Path(source.file)
    current = _digest(_read(mine)) if mine.is_file() else None
    problem = None
    if kept is not None and _digest(kept) != source.sha256:
        problem = f"{copy} is not the source the run recorded (its hash differs)"
    elif current is None:
        problem = (f"its model comes from {source.file}, which is not on this machine (a run "
                   "from elsewhere?)")
    elif current != source.sha256:
        problem = f"{source.file} has changed since the run was trained"
    elif not _known(source) or (source.module and _origin(source.module) != mine.resolve()):
        # a checkpoint from elsewhere may name any file here, and any module
        problem = (f"its model comes from {source.file}, which this user has not trained "
                   "with on this machine (a run from elsewhere?)")
    if problem is None:  # the user's own file, as it was
        text = kept if kept is not None else _read(mine)
        return import_module(source) if source.module else run_text(source, text)
    if not trust:
        shown = copy if kept is not None else source.file
        raise CnnlabError(f"{problem}; loading a model runs its code: read {shown}, then give "
                          "--trust-code to run the run's copy")
    if kept is None:
        raise CnnlabError(f"{problem}, and the run keeps no copy of it (no "
                          f"{copy.name if copy else 'model source'}); it cannot be rebuilt")
    return run_text(Source(str(copy.resolve()), source.attr, None, _digest(kept)), kept)


def construct(found: Any, name: str, facts: dict[str, Any], args: dict[str, Any]) -> Any:
    """Call a model class or function: the dataset's facts (`FACTS`) where its signature
    takes them, `args` (--model-arg) as given. The result must be an nn.Module."""
    from torch import nn

    try:
        params = inspect.signature(found).parameters
    except (TypeError, ValueError):
        params = {}
    takes_any = any(p.kind is p.VAR_KEYWORD for p in params.values())
    given = {k: v for k, v in facts.items() if k in params or (takes_any and k not in args)}
    given.update(args)
    if not takes_any:
        unknown = [k for k in args if k not in params]
        if unknown:
            raise CnnlabError(f"{label(name)} takes no argument {unknown[0]!r} (--model-arg); "
                              f"it takes {', '.join(params) or 'none'}")
    missing = [k for k, p in params.items() if p.default is p.empty and k not in given
               and p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    if missing:
        raise CnnlabError(f"{label(name)} needs argument {missing[0]!r}: give it as "
                          f"--model-arg {missing[0]}=VALUE (cnnlab fills in "
                          f"{', '.join(FACTS)} itself)")
    try:
        model = found(**given)
    except Exception as e:
        raise CnnlabError(f"{label(name)}(...) failed: {type(e).__name__}: "
                          f"{one_line(e, 200)}") from None
    if not isinstance(model, nn.Module):
        raise CnnlabError(f"{label(name)} returned a {type(model).__name__}, not an nn.Module")
    return model


def parse_args(text: str | None) -> dict[str, Any]:
    """--model-arg values as keyword arguments: "width=64, act=relu, sizes=(16, 32)" - Python
    literals, a bare word as text."""
    if not text:
        return {}
    try:
        call = ast.parse(f"f({text})", mode="eval").body
    except SyntaxError:
        call = None
    if not isinstance(call, ast.Call) or call.args or any(k.arg is None for k in call.keywords):
        raise CnnlabError(f"--model-arg {text!r}: give KEY=VALUE, e.g. --model-arg width=64")
    values = {}
    for keyword in call.keywords:
        node = keyword.value
        if isinstance(node, ast.Name):  # a bare word: text, or true/false/none
            values[keyword.arg] = _WORDS.get(node.id.lower(), node.id)
            continue
        try:
            values[keyword.arg] = ast.literal_eval(node)
        except ValueError:
            raise CnnlabError(f"--model-arg {keyword.arg}={ast.unparse(node)}: the value must "
                              "be a number, true/false, text or a tuple of them") from None
    return values


_WORDS = {"true": True, "false": False, "none": None}


def args_text(args: dict[str, Any]) -> str:
    """`parse_args`'s inverse: the canonical text of model arguments."""
    return ", ".join(f"{k}={v!r}" for k, v in args.items())
