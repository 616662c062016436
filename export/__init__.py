"""loc3r.export"""
