"""loc3r.synthetic"""
