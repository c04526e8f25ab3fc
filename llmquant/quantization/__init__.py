"""What runs at quantize time: a call checked and planned (planning), blocks from the model in memory
(in_memory) or streamed from disk (streaming, progress_folder) through the sequential pipeline
(pipeline), with what the algorithms need beside them: input statistics, scaling folds, rotations,
mixed-precision sensitivity and allocation.
"""
