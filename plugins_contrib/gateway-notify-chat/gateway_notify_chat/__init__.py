"""gateway-notify-chat: gateway events in a Slack or Microsoft Teams channel.

Installed, the plugin is found through the ``gateway.plugins`` entry point and stays
silent until ``GATEWAY_NOTIFY_CHAT_URL`` names an incoming webhook. Embedding code can
register a :class:`ChatNotifier` object instead (one per channel).
"""

from gateway_notify_chat.messages import EVENTS, build_message, render, slack_body, teams_body
from gateway_notify_chat.notifier import ENV_EVENTS, ENV_STYLE, ENV_URL, ChatNotifier, from_environment, gateway_notify

__version__ = "0.1.0"

__all__ = [
    "ENV_EVENTS",
    "ENV_STYLE",
    "ENV_URL",
    "EVENTS",
    "ChatNotifier",
    "build_message",
    "from_environment",
    "gateway_notify",
    "render",
    "slack_body",
    "teams_body",
]
