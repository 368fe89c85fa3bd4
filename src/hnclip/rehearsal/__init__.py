"""Scale rehearsal: the real (non-demo) pipeline path run on synthetic inputs at a chosen fraction of the real data.

``write_scale_world`` writes GQA/HNC, VQA v2 and TextVQA inputs in their published file formats, with real-size
images and a chosen fraction of the real counts; ``write_rehearsal_llava_base`` writes a stand-in for
``llava-hf/llava-1.5-7b-hf`` whose vision tower has the real shapes around a tiny language model. Together they let
one machine run preprocess → fine-tune → export → VQA on the real code path and measure its time and memory at two
sizes. Imports stay light here: import the submodules where needed.
"""
