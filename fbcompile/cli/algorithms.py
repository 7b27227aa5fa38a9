"""``fbcompile algorithms [ALGO]``: the registered algorithms and their options, from the registry,
and each algorithm's recommended settings per model family with their sources (fbcompile.recommended)."""
from __future__ import annotations

from ..errors import choices_text
from ..explain import format_table


def add_parser(commands):
    parser = commands.add_parser("algorithms", help="list the learning algorithms and their options",
                                 description="List the registered learning algorithms, or one algorithm's "
                                             "options with their defaults (pass them with --option KEY=VALUE) "
                                             "and its recommended settings per model family with their sources.")
    parser.add_argument("algorithm", nargs="?", metavar="ALGO", help="show this algorithm's options")
    parser.set_defaults(run=run)
    return parser


def summary(cls, width: int = 110) -> str:
    """The first paragraph of the learner class's docstring (or of its module's), shortened."""
    import sys
    for text in (cls.__doc__, getattr(sys.modules.get(cls.__module__), "__doc__", None)):
        if text and text.strip():
            line = " ".join(text.strip().split("\n\n")[0].split()).replace("``", "")
            return line if len(line) <= width else line[:line.rfind(" ", 0, width - 3)] + " ..."
    return ""


def run(args) -> int:
    from ..errors import OptionError
    from ..runtime import ALGORITHMS
    from ..runtime.base import COMMON_OPTIONS
    if args.algorithm is None:
        rows = [{"algorithm": name, "options": len(cls.OPTIONS), "about": summary(cls)}
                for name, cls in ALGORITHMS.items()]
        print(format_table(rows, ["algorithm", "options", "about"]))
        print("\nOptions of one algorithm: fbcompile algorithms ALGO; every algorithm also takes seed "
              "(default: the run's --seed).")
        return 0
    if args.algorithm not in ALGORITHMS:
        raise OptionError(f"unknown algorithm {args.algorithm!r}; use {choices_text(ALGORITHMS)}")
    cls = ALGORITHMS[args.algorithm]
    print(f"{args.algorithm}: {summary(cls)}\n")
    rows = []
    for name, option in {**COMMON_OPTIONS, **cls.OPTIONS}.items():
        choices = getattr(option.check, "choices", None)
        rows.append({"option": name, "default": repr(option.default),
                     "values": ", ".join(map(repr, choices)) if choices else "-", "meaning": option.doc})
    print(format_table(rows, ["option", "default", "values", "meaning"]))
    print()
    print(recommended_text(args.algorithm))
    print(f"\ne.g. fbcompile train --algo {args.algorithm} --option KEY=VALUE (overrides the recommendation)")
    return 0


def recommended_text(algorithm: str) -> str:
    """The recommended settings of ``algorithm`` for each model family, one row per setting with the
    value per family and the source(s), then the notes."""
    from ..recommended import FAMILIES, recommended
    recs = {family: recommended(algorithm, family) for family in FAMILIES}
    names = list(dict.fromkeys(k for r in recs.values() for k in r.settings()))
    rows = []
    for name in names:
        row = {"setting": name}
        sources = []
        for family, rec in recs.items():
            setting = rec.settings().get(name)
            row[family] = repr(setting.value) if setting else "-"
            if setting and setting.source not in sources:
                sources.append(setting.source)
        row["source"] = "; ".join(sources)
        rows.append(row)
    notes = list(dict.fromkeys(n for r in recs.values() for n in r.notes))
    text = ("Recommended settings (used by train, compare, bench and demo unless --lr, --optimizer, --loss, "
            "--condition, --epochs or --option override them; families: fc = fully connected, conv = "
            "convolutional, token = token-mixing):\n" + format_table(rows, ["setting", *FAMILIES, "source"]))
    return text + "".join(f"\n  note: {n}" for n in notes)
