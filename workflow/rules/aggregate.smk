# Tables over all runs, figures from the tables, captions for `snakemake --report`.

from tlmat.report.names import (
    FIGURE_FAMILIES,
    FIGURE_FORMATS,
    PUBLISHED_FIGURES,
    PUBLISHED_MODEL,
    SUMMARY_NAME,
    TABLE_NAMES,
)


def table_files(tables_dir):
    """Every file the aggregation writes into tables_dir: one CSV per table, then the summary."""
    return [f"{tables_dir}/{name}.csv" for name in TABLE_NAMES] + [
        f"{tables_dir}/{SUMMARY_NAME}"
    ]


def figure_files(figures_dir, stems, formats=FIGURE_FORMATS):
    """<figures_dir>/<stem>.<format> for every stem and format."""
    return [f"{figures_dir}/{stem}.{ext}" for stem in stems for ext in formats]


TABLES = table_files(f"{RESULTS}/tables")


def published_path(path):
    """A relative path is looked up in the working directory, then in the repository (where
    the shipped copy data/published/published_runs.csv lives)."""
    if path and not Path(path).is_absolute() and not Path(path).exists():
        shipped = Path(workflow.basedir) / path
        if shipped.exists():
            return str(shipped)
    return path


# published per-run results to compare with (null: no comparison, no parity figure)
PUBLISHED = published_path(config["published_results"])
# figures of the enabled families (FIGURE_FAMILIES: None = always, "published" = when
# published results are configured)
FIGURE_STEMS = [
    f"{name}_{config['model']['arch']}"
    for name, family in FIGURE_FAMILIES.items()
    if family is None
    or (bool(PUBLISHED) if family == "published" else FAMILIES[family])
]
FIGURES = figure_files(f"{RESULTS}/figures", FIGURE_STEMS)


rule aggregate:
    input:
        metrics=study_metrics,
        published=[PUBLISHED] if PUBLISHED else [],
        config=ancient(CONFIG),
    output:
        TABLES,
    log:
        f"{LOGS}/aggregate.log",
    conda:
        ENV
    params:
        defaults={k: config[k] for k in ("study", "finetune", "datasets")},
    script:
        "../scripts/aggregate.py"


rule figures:
    input:
        TABLES,
        config=ancient(CONFIG),
    output:
        [
            report(
                f"{RESULTS}/figures/{stem}.png",
                caption=f"../report/{stem.rsplit('_', 1)[0]}.rst",
                category="Figures",
            )
            for stem in FIGURE_STEMS
        ],
        [path for path in FIGURES if not path.endswith(".png")],
    log:
        f"{LOGS}/figures.log",
    conda:
        ENV
    params:
        runs=RUNS,
        expect=FIGURE_STEMS,
        datasets=config["datasets"],
    script:
        "../scripts/figures.py"


# `make paper`: the paper's tables and figures from its published per-run results alone
# (nothing is trained), into results/published/.
PAPER = f"{RESULTS}/published"
PAPER_SOURCE = PUBLISHED or published_path("data/published/published_runs.csv")
PAPER_TABLES = table_files(f"{PAPER}/tables")
PAPER_FIGURE_STEMS = [f"{name}_{PUBLISHED_MODEL}" for name in PUBLISHED_FIGURES]
PAPER_FIGURES = figure_files(f"{PAPER}/figures", PAPER_FIGURE_STEMS)


rule paper_tables:
    input:
        published=PAPER_SOURCE,
        config=ancient(CONFIG),
    output:
        PAPER_TABLES,
    log:
        f"{LOGS}/paper_tables.log",
    conda:
        ENV
    params:
        out=f"{PAPER}/tables",
    shell:
        "tlmat aggregate --config {input.config} --published-only --published {input.published} "
        "--out {params.out} > {log} 2>&1"


rule paper_figures:
    input:
        PAPER_TABLES,
        config=ancient(CONFIG),
    output:
        PAPER_FIGURES,
    log:
        f"{LOGS}/paper_figures.log",
    conda:
        ENV
    params:
        tables=f"{PAPER}/tables",
        out=f"{PAPER}/figures",
        names=" ".join(PUBLISHED_FIGURES),
        stems=" ".join(PAPER_FIGURE_STEMS),
    shell:
        "tlmat figures --config {input.config} --tables {params.tables} "
        "--runs {params.tables} --out {params.out} --only {params.names} "
        "--expect {params.stems} > {log} 2>&1"


rule paper:
    input:
        PAPER_TABLES,
        PAPER_FIGURES,
