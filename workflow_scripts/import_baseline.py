from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.io import write_json
    from hnclip.models import create_clip, save_clip
    from hnclip.provenance import provenance

    model, _, _ = create_clip(smk.params.model_name, pretrained=smk.params.pretrained)
    save_clip(model, smk.output.weights, metadata={"model_name": smk.params.model_name})
    write_json(smk.output.provenance, provenance(source=smk.params.pretrained, model_name=smk.params.model_name))


run_logged(snakemake, main)
