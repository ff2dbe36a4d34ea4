"""The engine: rooms that make training big and fast, apart from the lesson a student reads.

shards (streaming tar shards) · coco35l (COCO-35L captions in 35 languages) · index (faiss search at scale) ·
translate (English->Hindi captions with an open model) · downloads (files, archives, Hub files).
Lesson rooms reach them through their public names; everything is re-exported by `clip_utils`.
"""
