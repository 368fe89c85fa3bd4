# Tables and thesis figures: views of results/tables/summary.csv, built from result files alone.
rule summary:
    input:
        summary_inputs,
    output:
        summary=report(
            run_path("tables/summary.csv"),
            caption="../report/summary.rst",
            category="Tables",
        ),
        provenance=run_path("tables/summary.provenance.json"),
    log:
        run_path("logs/summary/summary.log"),
    conda:
        "../envs/report.yaml"
    params:
        models=MODELS,
        benchmarks=BENCHMARKS,
        allow_partial=config["report"]["allow_partial"],
    script:
        "../workflow_scripts/summary.py"


rule tables:
    input:
        summary=run_path("tables/summary.csv"),
    output:
        [
            report(
                path,
                caption=f"../report/table_{Path(path).stem}.rst",
                category="Tables",
            )
            for path in TABLE_FILES
        ],
    log:
        run_path("logs/tables/tables.log"),
    conda:
        "../envs/report.yaml"
    params:
        models=MODELS,
        benchmarks=BENCHMARKS,
        allow_partial=config["report"]["allow_partial"],
        objectives=OBJECTIVES_COMPARED,
        out_dir=lambda wildcards, output: str(Path(output[0]).parent),
    script:
        "../workflow_scripts/tables.py"


rule figures:
    input:
        summary=run_path("tables/summary.csv"),
        train_logs=train_log_inputs,
    output:
        [
            report(path, caption=f"../report/{stem}.rst", category="Figures")
            for stem in FIGURE_STEMS
            for path in figure_files(stem)
        ],
    log:
        run_path("logs/figures/figures.log"),
    conda:
        "../envs/report.yaml"
    params:
        models=MODELS,
        benchmarks=BENCHMARKS,
        allow_partial=config["report"]["allow_partial"],
        objectives=OBJECTIVES_COMPARED,
        train_logs=train_logs(),
        out_dir=lambda wildcards, output: str(Path(output[0]).parent),
    script:
        "../workflow_scripts/figures.py"


rule leakage_table:
    input:
        expand(
            run_path("data/compositional/{benchmark}_leakage.json"),
            benchmark=COMPOSITIONAL,
        ),
    output:
        csv=run_path("tables/leakage.csv"),
        md=run_path("tables/leakage.md"),
    log:
        run_path("logs/leakage_table/leakage_table.log"),
    conda:
        "../envs/report.yaml"
    script:
        "../workflow_scripts/leakage_table.py"
