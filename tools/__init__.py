"""Pictures and tables above the models and datasets: detections drawn on images, attention maps,
training curves, the ablation table of a sweep. Nothing below this package imports it."""
