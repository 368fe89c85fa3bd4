from hnclip.pipeline.workflow import run_logged


def main(smk):
    from hnclip.data.vqa import read_textvqa, read_vqav2, read_vqav2_testdev, stratified_subsample, write_questions

    paths, params = smk.params.paths, smk.params
    if params.dataset == "vqav2":
        questions = read_vqav2(
            paths["questions"], paths["annotations"], paths["images"], on_missing_image=params.on_missing_image
        )
    elif params.dataset == "vqav2_testdev":
        questions = read_vqav2_testdev(
            paths["testdev_questions"], paths["test_images"], on_missing_image=params.on_missing_image
        )
    else:
        questions = read_textvqa(
            paths["questions"],
            paths["images"],
            ocr_json=paths["ocr"] if params.use_ocr else None,
            on_missing_image=params.on_missing_image,
        )
    if params.subsample:
        questions = stratified_subsample(questions, params.subsample, params.seed)
    metadata = {"subsample": params.subsample, "seed": params.seed, "inputs": dict(paths)}
    write_questions(questions, smk.output[0], metadata=metadata)


run_logged(snakemake, main)
