"""loc3r.runtime"""
