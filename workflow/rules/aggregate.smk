# Tables over all runs, figures from the tables, captions for `snakemake --report`.

TABLE_NAMES = (
    "runs",
    "scratch",
    "pairwise_grid",
    "ft_size_sweep",
    "pt_size_sweep",
    "strategies",
    "learning_rate",
    "mpt",
    "chains",
    "headline",
    "comparison",
)
TABLES = [f"{RESULTS}/tables/{name}.csv" for name in TABLE_NAMES] + [
    f"{RESULTS}/tables/summary.md"
]

# figure -> the study family whose runs it needs (None: always drawn)
FIGURE_FAMILIES = {
    "pairwise_r2": "pairwise",
    "pairwise_mae": "pairwise",
    "r2_vs_ft_size": "pairwise",
    "r2_vs_pt_size": "pt_size_sweep",
    "strategies": "strategies",
    "learning_rate": "learning_rate",
    "learning_curves": None,
    "parity": None,
    "mpt": "mpt",
    "chains": "chains",
    "chain_curves": "chains",
    "published_parity": "published",
}


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
FIGURE_STEMS = [
    f"{name}_{config['model']['arch']}"
    for name, family in FIGURE_FAMILIES.items()
    if family is None
    or (bool(PUBLISHED) if family == "published" else FAMILIES[family])
]
FIGURES = [
    f"{RESULTS}/figures/{stem}.{ext}" for stem in FIGURE_STEMS for ext in ("png", "pdf")
]


rule aggregate:
    input:
        metrics=METRICS,
        published=[PUBLISHED] if PUBLISHED else [],
    output:
        TABLES,
    log:
        f"{LOGS}/aggregate.log",
    conda:
        ENV
    params:
        config=CONFIG,
        defaults={k: config[k] for k in ("study", "finetune", "datasets")},
    script:
        "../scripts/aggregate.py"


rule figures:
    input:
        TABLES,
    output:
        [
            report(
                f"{RESULTS}/figures/{stem}.png",
                caption=f"../report/{stem.rsplit('_', 1)[0]}.rst",
                category="Figures",
            )
            for stem in FIGURE_STEMS
        ],
        [f"{RESULTS}/figures/{stem}.pdf" for stem in FIGURE_STEMS],
    log:
        f"{LOGS}/figures.log",
    conda:
        ENV
    params:
        config=CONFIG,
        runs=RUNS,
        expect=FIGURE_STEMS,
        datasets=config["datasets"],
    script:
        "../scripts/figures.py"


# `make paper`: the paper's tables and figures from its published per-run results alone
# (nothing is trained), into results/published/.
PAPER = f"{RESULTS}/published"
PAPER_SOURCE = PUBLISHED or published_path("data/published/published_runs.csv")
PAPER_FIGURE_NAMES = (
    "pairwise_r2",
    "pairwise_mae",
    "r2_vs_ft_size",
    "r2_vs_pt_size",
    "strategies",
    "learning_rate",
)
PAPER_TABLES = [f"{PAPER}/tables/{name}.csv" for name in TABLE_NAMES] + [
    f"{PAPER}/tables/summary.md"
]
PAPER_FIGURES = [
    f"{PAPER}/figures/{name}_alignn.{ext}"
    for name in PAPER_FIGURE_NAMES
    for ext in ("png", "pdf")
]


rule paper_tables:
    input:
        PAPER_SOURCE,
    output:
        PAPER_TABLES,
    log:
        f"{LOGS}/paper_tables.log",
    conda:
        ENV
    params:
        config=CONFIG,
        out=f"{PAPER}/tables",
    shell:
        "tlmat aggregate --config {params.config} --published-only --published {input} "
        "--out {params.out} > {log} 2>&1"


rule paper_figures:
    input:
        PAPER_TABLES,
    output:
        PAPER_FIGURES,
    log:
        f"{LOGS}/paper_figures.log",
    conda:
        ENV
    params:
        config=CONFIG,
        tables=f"{PAPER}/tables",
        out=f"{PAPER}/figures",
        names=" ".join(PAPER_FIGURE_NAMES),
        stems=" ".join(f"{name}_alignn" for name in PAPER_FIGURE_NAMES),
    shell:
        "tlmat figures --config {params.config} --tables {params.tables} "
        "--runs {params.tables} --out {params.out} --only {params.names} "
        "--expect {params.stems} > {log} 2>&1"


rule paper:
    input:
        PAPER_TABLES,
        PAPER_FIGURES,
