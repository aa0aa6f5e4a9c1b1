"""introvert"""
