"""What runs at quantize time: a call checked and planned (planning), blocks from the model in memory
(in_memory) or streamed from disk (streaming, progress_folder) through the sequential pipeline
(pipeline), and mixed precision chosen from measured sensitivity (sensitivity, allocation).
"""
