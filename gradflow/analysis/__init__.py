"""The analysis: reads what runs recorded (windows.py), says what it means (diagnose.py), and
draws and compares it (plots.py, compare.py). It never trains."""
