"""Checkpoint folders on disk: written atomically (checkpoint), read strictly (safetensors_file), small
integers packed into words (bitpack).
"""
