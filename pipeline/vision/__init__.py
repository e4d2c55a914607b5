"""The faces stage's machinery: decoding (``video``), MTCNN detection (``detect``), linking
detections into tracks and choosing the subject (``track``), and alignment to a template
(``align``). None of it reads a config or writes a file: ``pipeline.faces`` does both."""
