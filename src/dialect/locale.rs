//! The voice dialect's error sentences, in English or in Korean (`--locale`): what a person
//! hears or reads when a request cannot be answered. Short and human, never internals; the
//! stable code a program matches on travels beside them (`data.code`).

use std::borrow::Cow;

use clap::ValueEnum;

/// The language of the voice dialect's sentences.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, ValueEnum)]
pub enum Locale {
    /// English.
    #[default]
    En,
    /// Korean (한국어), the voice-chat backend's own sentences.
    Ko,
}

/// What a voice client is told went wrong.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Sentence {
    /// The session does not exist: never created, or deleted (also during a reply).
    SessionExpired,
    EmptyMessage,
    MessageTooLong {
        max: usize,
    },
    InvalidEmotion,
    InvalidTimestamp,
    /// Not JSON, not an object, or `data`/`message` of the wrong kind.
    InvalidFormat,
    UnknownType,
    TooManyRequests,
    AiUnavailable,
    AiTimeout,
    /// The relay itself cannot serve the request now (its store, or a client too slow).
    ServiceUnavailable,
    /// The connection's token expired.
    SignInExpired,
}

impl Sentence {
    pub(crate) fn say(self, locale: Locale) -> Cow<'static, str> {
        use Sentence::*;
        match (locale, self) {
            (Locale::En, SessionExpired) => "the session has expired".into(),
            (Locale::En, EmptyMessage) => "the message is empty".into(),
            (Locale::En, MessageTooLong { max }) => {
                format!("message too long (max {max} characters)").into()
            }
            (Locale::En, InvalidEmotion) => "invalid emotion".into(),
            (Locale::En, InvalidTimestamp) => "invalid timestamp".into(),
            (Locale::En, InvalidFormat) => "invalid request".into(),
            (Locale::En, UnknownType) => "unknown message type".into(),
            (Locale::En, TooManyRequests) => "too many requests".into(),
            (Locale::En, AiUnavailable) => "the AI service is temporarily unavailable".into(),
            (Locale::En, AiTimeout) => "the AI service took too long to answer".into(),
            (Locale::En, ServiceUnavailable) => "the service is temporarily unavailable".into(),
            (Locale::En, SignInExpired) => "your sign-in has expired".into(),
            (Locale::Ko, SessionExpired) => "세션이 만료되었습니다".into(),
            (Locale::Ko, EmptyMessage) => "메시지가 비어 있습니다".into(),
            (Locale::Ko, MessageTooLong { max }) => {
                format!("메시지가 너무 깁니다 (최대 {max}자)").into()
            }
            (Locale::Ko, InvalidEmotion) => "지원하지 않는 감정입니다".into(),
            (Locale::Ko, InvalidTimestamp) => "타임스탬프가 올바르지 않습니다".into(),
            (Locale::Ko, InvalidFormat) => "잘못된 요청입니다".into(),
            (Locale::Ko, UnknownType) => "알 수 없는 메시지 유형입니다".into(),
            (Locale::Ko, TooManyRequests) => "요청 횟수가 초과되었습니다".into(),
            (Locale::Ko, AiUnavailable) => "AI 서비스가 일시적으로 사용할 수 없습니다".into(),
            (Locale::Ko, AiTimeout) => "AI 응답 시간이 초과되었습니다".into(),
            (Locale::Ko, ServiceUnavailable) => "서비스를 일시적으로 사용할 수 없습니다".into(),
            (Locale::Ko, SignInExpired) => "인증이 만료되었습니다".into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_seeds_sentences() {
        let long = Sentence::MessageTooLong { max: 2000 };
        assert_eq!(
            long.say(Locale::En),
            "message too long (max 2000 characters)"
        );
        assert_eq!(long.say(Locale::Ko), "메시지가 너무 깁니다 (최대 2000자)");
        assert_eq!(
            Sentence::SessionExpired.say(Locale::Ko),
            "세션이 만료되었습니다"
        );
        assert_eq!(
            Sentence::TooManyRequests.say(Locale::Ko),
            "요청 횟수가 초과되었습니다"
        );
        assert_eq!(
            Sentence::AiUnavailable.say(Locale::Ko),
            "AI 서비스가 일시적으로 사용할 수 없습니다"
        );
    }
}
