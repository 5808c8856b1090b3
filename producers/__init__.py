"""Publishers of lab detections and border seizures, and the stream simulator."""
