"""USE (use-paper §3.1): captions, noun phrases → referring expressions, caption grounding, segment–text pairs,
and their COCO export and previews."""
