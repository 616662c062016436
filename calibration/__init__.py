"""loc3r.calibration"""
